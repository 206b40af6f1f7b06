"""Augmentation: the big_vision-style spec, crops and normalisation (host, grain), geometric and
intensity ops written once for numpy and jax.numpy, and their on-device use inside the step."""
