"""MGRPO's library half: config section, advantages and losses (pure), revision prompts and `revise`.

    tifa train mgrpo configs/tiny.yaml      # the stage (stages/mgrpo.py) that uses all of this

Kept light: importing `tifaforge.rl` or `tifaforge.rl.config` never imports torch (config.py wires
`MGRPOConfig` in); `rl.losses` and `rl.revise` import torch / the engine where they are used.
"""

from tifaforge.rl.config import MGRPOConfig

__all__ = ["MGRPOConfig"]
