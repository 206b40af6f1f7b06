"""Ahead-of-time compilation of a run's programs for TPU slices and NVIDIA GPUs that this machine
does not have: per-chip memory, FLOPs, a roofline bound, and what to change when one does not fit."""
