"""Qwen2.5-VL in Flax NNX, with Hugging Face checkpoint conversion in both directions."""

from robot_r1_jax.model.config import (PRESETS, ConfigError, ModelConfig, TextConfig, VisionConfig,
                                       from_hf_config, qwen2_5_vl_3b, qwen2_5_vl_7b, small, tiny,
                                       to_hf_config)
from robot_r1_jax.model.hf_io import load_hf, save_hf
from robot_r1_jax.model.hf_names import ConversionError
from robot_r1_jax.model.packing import Packed
from robot_r1_jax.model.qwen2_5_vl import Decoded, Output, Prefill, Qwen25VL, init_model
from robot_r1_jax.model.rope import RopeIndex, decode_positions, get_rope_index
from robot_r1_jax.model.text import KVCache

__all__ = [
    "PRESETS", "ConfigError", "ConversionError", "Decoded", "KVCache", "ModelConfig", "Output",
    "Packed", "Prefill", "Qwen25VL", "RopeIndex", "TextConfig", "VisionConfig", "decode_positions",
    "from_hf_config", "get_rope_index", "init_model", "load_hf", "qwen2_5_vl_3b",
    "qwen2_5_vl_7b", "save_hf", "small", "tiny", "to_hf_config",
]
