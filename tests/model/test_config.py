"""Configs: presets, Hugging Face config.json round trip, errors that name the field."""

from __future__ import annotations

import dataclasses

import pytest

from robot_r1_jax.model import config as config_lib


@pytest.mark.parametrize("name", sorted(config_lib.PRESETS))
def test_presets_round_trip_through_hf_dict(name):
  cfg = config_lib.PRESETS[name]()
  assert config_lib.from_hf_config(config_lib.to_hf_config(cfg)) == cfg


def test_hub_flat_layout_with_rope_scaling():
  hub = {  # the shape of Qwen/Qwen2.5-VL-3B-Instruct's config.json
      "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
      "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
      "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
      "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 2048,
      "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
      "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": 16,
      "num_hidden_layers": 36, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
      "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
      "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
      "use_sliding_window": False,
      "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280,
                        "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
                        "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2,
                        "spatial_patch_size": 14, "window_size": 112,
                        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                        "temporal_patch_size": 2},
      "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
      "vocab_size": 151936,
  }
  assert config_lib.from_hf_config(hub) == config_lib.qwen2_5_vl_3b()


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["text_config"]["rope_parameters"].update(mrope_section=[2, 3, 4]),
     "mrope_section"),
    (lambda d: d["vision_config"].update(out_hidden_size=64), "out_hidden_size"),
    (lambda d: d["text_config"].update(hiden_size=3), "hiden_size"),
    (lambda d: d["vision_config"].update(depht=3), "depht"),
    (lambda d: d["text_config"].update(hidden_act="gelu"), "hidden_act"),
    (lambda d: d["text_config"].update(num_key_value_heads=4), "num_key_value_heads"),
    (lambda d: d.update(image_token_id=5000), "image_token_id"),
])
def test_bad_fields_are_named(mutate, field):
  d = config_lib.to_hf_config(config_lib.tiny())
  mutate(d)
  with pytest.raises(config_lib.ConfigError, match=field):
    config_lib.from_hf_config(d)


def test_transformers_accepts_our_dict():
  transformers = pytest.importorskip("transformers")
  cfg = config_lib.tiny()
  hf = transformers.Qwen2_5_VLConfig(**config_lib.to_hf_config(cfg))
  assert hf.text_config.rope_parameters["mrope_section"] == list(cfg.text.mrope_section)
  assert hf.vision_config.out_hidden_size == cfg.text.hidden_size
  assert dataclasses.replace(cfg.text, num_layers=4).num_layers == 4
