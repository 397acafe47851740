"""paro: PAROAttention for diffusers video and image transformers."""

__version__ = "0.1.0"
