"""capfilt: curate web image-text datasets with BLIP's CapFilt, and pretrain on them."""

__version__ = "0.1.0"
