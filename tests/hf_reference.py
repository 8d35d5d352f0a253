"""Test helpers: tiny random Hugging Face Qwen2.5-VL references built from configs (no downloads)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from robot_r1_jax.model import config as config_lib


def tiny_config(tie: bool = True) -> config_lib.ModelConfig:
  cfg = config_lib.tiny()
  return cfg.replace(text=dataclasses.replace(cfg.text, tie_word_embeddings=tie))


def build_hf(cfg: config_lib.ModelConfig, seed: int = 0):
  """A random transformers model for `cfg` with non-trivial norms and biases (zeros/ones would
  hide a mis-mapped tensor)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(seed)
  hf_cfg = transformers.Qwen2_5_VLConfig(**config_lib.to_hf_config(cfg))
  hf_cfg._attn_implementation = "eager"  # fp32 softmax, the reference numerics
  model = transformers.Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith("ln_q.weight") or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


def hf_positions(hf_model, input_ids: np.ndarray, mask: np.ndarray, grid=None):
  """transformers' own 3-D positions (it applies them only when mm_token_type_ids is given)."""
  import torch
  ids = torch.from_numpy(input_ids)
  pos, _ = hf_model.model.get_rope_index(
      ids, mm_token_type_ids=(ids == hf_model.config.image_token_id).int(),
      image_grid_thw=None if grid is None else torch.from_numpy(np.asarray(grid)),
      attention_mask=torch.from_numpy(mask))
  return pos


def hf_logits(hf_model, input_ids, mask, pixel_values=None, grid=None) -> np.ndarray:
  import torch
  with torch.no_grad():
    out = hf_model(
        input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
        position_ids=hf_positions(hf_model, input_ids, mask, grid),
        pixel_values=None if pixel_values is None else torch.from_numpy(pixel_values),
        image_grid_thw=None if grid is None else torch.from_numpy(np.asarray(grid)))
  return out.logits.float().numpy()


def left_padded_batch(rng: np.random.Generator, lengths, total: int, vocab: int = 1000):
  ids = np.zeros((len(lengths), total), np.int64)
  mask = np.zeros((len(lengths), total), np.int64)
  for b, n in enumerate(lengths):
    ids[b, total - n:] = rng.integers(0, vocab, size=n)
    mask[b, total - n:] = 1
  return ids, mask
