"""Sweeps' parts that Optuna supplies, chosen by the config: samplers and pruners, study
storages, what a sweep tries, and the results read back from a study (unet_jax/sweeps.py runs
the study)."""
