"""Quantization formats written bit-exactly to what the on-device engine reads (see ../shared/research/quantization.md),
the calibrated ways to fill them (calibrated: awq, gptq) and the 04_quantize stage (stage)."""
