"""Quantization formats written bit-exactly to what the on-device engine reads (see ../shared/research/quantization.md)."""
