"""oneDNN convolutions for XLA:CPU through FFI custom calls, built from conv.cc on first use.

  build.py  finds oneDNN and a compiler, builds the extension into a per-user cache, loads it
            and registers its FFI targets (or warns once and reports it unavailable)
  ops.py    `conv`, `conv_transpose`: convolutions and their VJPs as custom calls;
            `conv_epilogue`: an inference convolution with bias and ReLU post-ops;
            `available`, `supports`
  conv.cc   the C++ side: oneDNN primitives cached per geometry
"""

from unet_jax.models.onednn.ops import available, conv, conv_epilogue, conv_transpose, supports

__all__ = ['available', 'conv', 'conv_epilogue', 'conv_transpose', 'supports']
