"""lmlab: train, watch and sample small language models."""

__version__ = "0.1.0"
