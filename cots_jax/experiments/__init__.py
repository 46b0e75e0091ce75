"""Experiment grids (configs/grids.py): `python -m cots_jax.experiments run --grid=NAME
--workdir=DIR [--seeds=3] [--base_arg=model=base] [--only=VARIANT,...]` runs every (variant,
seed) of a grid as a resumable `cots_jax.main` child (runner.py); `python -m
cots_jax.experiments report --workdir=DIR` writes the tables and charts of the finished runs
(report.py).
"""
