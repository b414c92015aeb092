"""tifaforge: make and serve role-play models the Tifa way (CPT, CoT SFT, MGRPO, anti-repetition DPO).

Kept import-light on purpose: `import tifaforge` must not pull torch or transformers.
"""

__version__ = "0.1.0"
