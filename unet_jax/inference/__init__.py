"""Inference: overlap-tile prediction with test-time augmentation, predict mode on image files,
post-processing, the dense CRF and StableHLO export."""
