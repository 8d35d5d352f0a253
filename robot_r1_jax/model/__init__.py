"""Qwen2.5-VL in Flax NNX."""
