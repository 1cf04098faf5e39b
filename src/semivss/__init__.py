"""semivss: semi-supervised video semantic segmentation toolbox."""

__version__ = "0.1.0"
