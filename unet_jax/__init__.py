"""unet-jax: U-Net and its family for image segmentation in JAX/Flax."""

__version__ = '0.1.0'
