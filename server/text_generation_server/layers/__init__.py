"""Tensor-parallel building blocks: each layer creates and loads only its rank's shard.

Import the submodules directly (``layers.linear``, ``layers.attention``, ...);
this package deliberately imports nothing so quantization methods can use the
loading helpers without import cycles.
"""
