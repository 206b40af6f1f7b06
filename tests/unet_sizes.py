"""The size arithmetic of a plain U-Net, through the models' size contract (test helpers)."""

from unet_jax.models import UNet


def output_size(size, *, depth, padding):
  return UNet(depth=depth, padding=padding).output_size(size)


def valid_input_size(min_output, *, depth, padding):
  return UNet(depth=depth, padding=padding).valid_input_size(min_output)


def valid_input_sizes(*, depth, count=5, start=1):
  return UNet(depth=depth, padding='VALID').valid_input_sizes(count, start)
