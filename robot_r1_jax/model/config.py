"""Qwen2.5-VL configuration: frozen dataclasses, presets, and Hugging Face config.json conversion.

Dimension alphabet (used across the package): B batch · T query length · S key length · D model width ·
F MLP width · N query heads · K kv heads · H head dim · V vocab · P vision patches · G samples per
prompt · L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


class ConfigError(ValueError):
  """A configuration field is unknown, missing or inconsistent; the message names the field."""


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The language-model half (Qwen2 decoder with multimodal RoPE)."""

  vocab_size: int  # V
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int  # L
  num_heads: int  # N
  num_kv_heads: int  # K
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  mrope_section: tuple[int, int, int] = (16, 24, 24)
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 128_000

  @property
  def head_dim(self) -> int:  # H; Hugging Face derives it as D // N, never from a config key.
    return self.hidden_size // self.num_heads

  def __post_init__(self):
    _positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads")
    if self.hidden_size % self.num_heads:
      raise ConfigError(
          f"text hidden_size={self.hidden_size} is not divisible by num_attention_heads="
          f"{self.num_heads}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"text num_attention_heads={self.num_heads} is not divisible by num_key_value_heads="
          f"{self.num_kv_heads}")
    if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
      raise ConfigError(
          f"mrope_section={list(self.mrope_section)} must have 3 entries summing to head_dim/2="
          f"{self.head_dim // 2} (head_dim = hidden_size / num_attention_heads = {self.head_dim})")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The vision tower (ViT with 2-D RoPE, window attention and a 2x2 patch merger)."""

  depth: int
  hidden_size: int
  intermediate_size: int
  num_heads: int
  out_hidden_size: int
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  window_size: int = 112
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  in_channels: int = 3
  tokens_per_second: int = 2
  rope_theta: float = 10_000.0

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch vector: C · temporal · patch · patch (1176 for Qwen2.5-VL)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  def __post_init__(self):
    _positive(self, "depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
              "window_size", "patch_size", "temporal_patch_size", "spatial_merge_size",
              "in_channels")
    if self.hidden_size % self.num_heads:
      raise ConfigError(
          f"vision hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
    if self.head_dim % 4:
      # The 2-D rotary table splits head_dim/2 evenly between rows and columns.
      raise ConfigError(f"vision head_dim={self.head_dim} (hidden_size/num_heads) must be a "
                        "multiple of 4")
    if self.window_size % (self.patch_size * self.spatial_merge_size):
      raise ConfigError(
          f"vision window_size={self.window_size} is not a multiple of patch_size*"
          f"spatial_merge_size={self.patch_size * self.spatial_merge_size}")
    bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
    if bad:
      raise ConfigError(f"vision fullatt_block_indexes={list(self.fullatt_block_indexes)} has "
                        f"entries outside [0, depth={self.depth}): {bad}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A whole Qwen2.5-VL model: text decoder, vision tower and the special token ids that join them."""

  text: TextConfig
  vision: VisionConfig
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int | None = 151643
  eos_token_id: int | None = 151645

  def __post_init__(self):
    if self.vision.out_hidden_size != self.text.hidden_size:
      raise ConfigError(
          f"vision_config.out_hidden_size={self.vision.out_hidden_size} must equal the text "
          f"hidden_size={self.text.hidden_size}")
    for name in ("image_token_id", "video_token_id", "vision_start_token_id",
                 "vision_end_token_id"):
      if not 0 <= getattr(self, name) < self.text.vocab_size:
        raise ConfigError(f"{name}={getattr(self, name)} is outside the vocabulary "
                          f"[0, {self.text.vocab_size})")

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


def _positive(cfg, *names):
  for name in names:
    value = getattr(cfg, name)
    if not isinstance(value, int) or value <= 0:
      raise ConfigError(f"{type(cfg).__name__}.{name} must be a positive integer, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Presets. The 3B/7B values are the hub config.json values, not transformers' class defaults.


def _qwen_vision(out_hidden_size: int) -> VisionConfig:
  return VisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                      out_hidden_size=out_hidden_size)


def qwen2_5_vl_3b() -> ModelConfig:
  return ModelConfig(
      text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                      num_heads=16, num_kv_heads=2, tie_word_embeddings=True),
      vision=_qwen_vision(2048))


def qwen2_5_vl_7b() -> ModelConfig:
  return ModelConfig(
      text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                      num_heads=28, num_kv_heads=4, tie_word_embeddings=False),
      vision=_qwen_vision(3584))


# The package's tiny tokenizer (model/assets/tokenizer) has 1000 byte-level BPE tokens followed by the
# 22 Qwen special tokens in Qwen's order, so <|image_pad|> is 1000 + 12 etc. Vocabularies of the tiny
# and small models are padded past the tokenizer (1031, prime), as the real models pad past theirs.
TINY_SPECIAL_BASE = 1000
_TINY_TOKENS = dict(image_token_id=TINY_SPECIAL_BASE + 12, video_token_id=TINY_SPECIAL_BASE + 13,
                    vision_start_token_id=TINY_SPECIAL_BASE + 9,
                    vision_end_token_id=TINY_SPECIAL_BASE + 10,
                    bos_token_id=TINY_SPECIAL_BASE + 0, eos_token_id=TINY_SPECIAL_BASE + 2)


def tiny() -> ModelConfig:
  """Tests: distinct, prime-ish sizes so that a transposed weight fails loudly."""
  return ModelConfig(
      text=TextConfig(vocab_size=1031, hidden_size=96, intermediate_size=232, num_layers=3,
                      num_heads=6, num_kv_heads=2, mrope_section=(2, 3, 3),
                      tie_word_embeddings=True),
      vision=VisionConfig(depth=3, hidden_size=48, intermediate_size=68, num_heads=4,
                          out_hidden_size=96, fullatt_block_indexes=(1,)),
      **_TINY_TOKENS)


def small() -> ModelConfig:
  """≈35M parameters: CPU benchmarks and learning runs."""
  return ModelConfig(
      text=TextConfig(vocab_size=1031, hidden_size=512, intermediate_size=1408, num_layers=10,
                      num_heads=8, num_kv_heads=2, mrope_section=(8, 12, 12),
                      tie_word_embeddings=True),
      vision=VisionConfig(depth=4, hidden_size=256, intermediate_size=704, num_heads=4,
                          out_hidden_size=512, fullatt_block_indexes=(1, 3)),
      **_TINY_TOKENS)


PRESETS = {"tiny": tiny, "small": small, "qwen2_5_vl_3b": qwen2_5_vl_3b,
           "qwen2_5_vl_7b": qwen2_5_vl_7b}


# ----------------------------------------------------------------------------------------------
# Hugging Face config.json <-> ModelConfig.

# Keys that Hugging Face writes and that carry nothing this implementation needs (or that must hold a
# value checked below). Anything else is unknown and rejected, so that a typo or an unsupported feature
# (sliding windows, another activation) never silently changes the model.
_IGNORED_TOP = {"architectures", "dtype", "torch_dtype", "model_type", "transformers_version",
                "_name_or_path", "initializer_range", "use_cache", "attention_dropout",
                "pad_token_id", "max_window_layers", "sliding_window", "layer_types",
                "vision_token_id", "output_attentions", "output_hidden_states", "return_dict",
                "use_return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
                "tokenizer_class", "id2label", "label2id", "problem_type", "text_config",
                "vision_config"}
_IGNORED_VISION = {"model_type", "initializer_range", "dtype", "torch_dtype", "spatial_patch_size",
                   "_name_or_path", "transformers_version", "architectures"}

_TEXT_KEYS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
              "intermediate_size": "intermediate_size", "num_hidden_layers": "num_layers",
              "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
              "rms_norm_eps": "rms_norm_eps", "max_position_embeddings": "max_position_embeddings"}
_VISION_KEYS = {"depth": "depth", "hidden_size": "hidden_size",
                "intermediate_size": "intermediate_size", "num_heads": "num_heads",
                "out_hidden_size": "out_hidden_size",
                "fullatt_block_indexes": "fullatt_block_indexes", "window_size": "window_size",
                "patch_size": "patch_size", "temporal_patch_size": "temporal_patch_size",
                "spatial_merge_size": "spatial_merge_size", "in_channels": "in_channels",
                "in_chans": "in_channels", "tokens_per_second": "tokens_per_second"}
_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
               "bos_token_id", "eos_token_id")


def from_hf_config(hf: Mapping[str, Any]) -> ModelConfig:
  """Reads a Qwen2.5-VL config.json dict: the hub's flat layout or transformers 5's `text_config`.

  Reads `rope_scaling` (hub) and `rope_parameters` (transformers 5) alike. Raises ConfigError naming
  the field on unknown keys, unsupported values or inconsistent sizes.
  """
  hf = dict(hf)
  if hf.get("model_type", "qwen2_5_vl") != "qwen2_5_vl":
    raise ConfigError(f"model_type={hf['model_type']!r}: only 'qwen2_5_vl' is supported")
  text = dict(hf.get("text_config") or {})
  # Hub files are flat; transformers 5 nests the text fields. Nested values win where both exist.
  merged = {**{k: v for k, v in hf.items() if k not in text}, **text}
  tie = bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
  text_cfg = _text_config(merged, tie)
  vision_cfg = _vision_config(dict(hf.get("vision_config") or {}), text_cfg.hidden_size)
  tokens = {k: merged[k] for k in _TOKEN_KEYS if k in merged}
  if isinstance(tokens.get("eos_token_id"), list):
    tokens["eos_token_id"] = tokens["eos_token_id"][0]
  return ModelConfig(text=text_cfg, vision=vision_cfg, **tokens)


def _text_config(merged: dict[str, Any], tie: bool) -> TextConfig:
  """The decoder's fields of a (flattened) config.json."""
  known = (set(_TEXT_KEYS) | set(_TOKEN_KEYS) | _IGNORED_TOP
           | {"hidden_act", "rope_scaling", "rope_parameters", "rope_theta", "tie_word_embeddings",
              "use_sliding_window"})
  unknown = sorted(set(merged) - known)
  if unknown:
    raise ConfigError(f"unknown Qwen2.5-VL config field(s): {', '.join(unknown)}")
  if merged.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"hidden_act={merged['hidden_act']!r}: only 'silu' is supported")
  if merged.get("use_sliding_window"):
    raise ConfigError("use_sliding_window=true is not supported (Qwen2.5-VL checkpoints use "
                      "full attention)")
  missing = [k for k in _TEXT_KEYS if k not in merged and k != "max_position_embeddings"
             and k != "rms_norm_eps"]
  if missing:
    raise ConfigError(f"config.json is missing text field(s): {', '.join(missing)}")

  rope = dict(merged.get("rope_parameters") or merged.get("rope_scaling") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", "mrope"):
    raise ConfigError(f"rope_parameters.rope_type={rope_type!r}: only default/mrope is supported")
  mrope = tuple(rope.get("mrope_section", (16, 24, 24)))
  theta = rope.get("rope_theta", merged.get("rope_theta", 1_000_000.0))

  kwargs = {ours: merged[theirs] for theirs, ours in _TEXT_KEYS.items() if theirs in merged}
  if kwargs.get("num_kv_heads") is None:
    kwargs["num_kv_heads"] = kwargs["num_heads"]
  return TextConfig(**kwargs, rope_theta=float(theta), mrope_section=mrope,
                    tie_word_embeddings=tie)


def _vision_config(vision: dict[str, Any], text_hidden: int) -> VisionConfig:
  """The vision tower's fields (`vision_config` of config.json)."""
  unknown = sorted(set(vision) - set(_VISION_KEYS) - _IGNORED_VISION
                   - {"hidden_act", "rope_parameters"})
  if unknown:
    raise ConfigError(f"unknown vision_config field(s): {', '.join(unknown)}")
  if vision.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"vision_config.hidden_act={vision['hidden_act']!r}: only 'silu' is "
                      "supported")
  kwargs = {ours: vision[theirs] for theirs, ours in _VISION_KEYS.items() if theirs in vision}
  for name in ("depth", "hidden_size", "intermediate_size", "num_heads"):
    if name not in kwargs:
      raise ConfigError(f"config.json is missing vision_config.{name}")
  kwargs.setdefault("out_hidden_size", text_hidden)
  kwargs["fullatt_block_indexes"] = tuple(kwargs.get("fullatt_block_indexes", (7, 15, 23, 31)))
  rope = vision.get("rope_parameters") or {}
  if "rope_theta" in rope:
    kwargs["rope_theta"] = float(rope["rope_theta"])
  return VisionConfig(**kwargs)


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
  """A transformers-5 style config.json dict that `Qwen2_5_VLConfig` loads back to `cfg`."""
  t, v = cfg.text, cfg.vision
  return {
      "architectures": ["Qwen2_5_VLForConditionalGeneration"],
      "model_type": "qwen2_5_vl",
      "dtype": "float32",
      "tie_word_embeddings": t.tie_word_embeddings,
      **{k: getattr(cfg, k) for k in _TOKEN_KEYS},
      "text_config": {
          "model_type": "qwen2_5_vl_text",
          **{theirs: getattr(t, ours) for theirs, ours in _TEXT_KEYS.items()},
          "hidden_act": "silu",
          "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                              "mrope_section": list(t.mrope_section)},
          "tie_word_embeddings": t.tie_word_embeddings,
          "bos_token_id": cfg.bos_token_id,
          "eos_token_id": cfg.eos_token_id,
      },
      "vision_config": {
          "model_type": "qwen2_5_vl_vision",
          **{theirs: getattr(v, ours) for theirs, ours in _VISION_KEYS.items() if theirs != "in_chans"},
          "fullatt_block_indexes": list(v.fullatt_block_indexes),
          "hidden_act": "silu",
          "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
      },
  }
