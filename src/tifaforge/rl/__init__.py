"""MGRPO's library half: advantages and losses (pure), and the self-revision pass (a caller of the engine).

    tifa train mgrpo configs/tiny.yaml      # the stage (stages/mgrpo.py) that uses all of this

The `mgrpo:` config section is `tifaforge.config.MGRPOConfig`. `rl.losses` imports torch and
`rl.revise` the engine where they are used, so importing `tifaforge.rl` stays light.
"""
