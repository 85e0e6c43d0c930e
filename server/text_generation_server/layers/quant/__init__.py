"""Quantization strategies for linear layers, chosen once in :mod:`.registry`."""
