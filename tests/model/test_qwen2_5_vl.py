"""The full model: KV-cache decoding, parameter counts of the real presets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from robot_r1_jax.model import config as config_lib
from robot_r1_jax.model import rope
from robot_r1_jax.model.qwen2_5_vl import Qwen25VL, init_model

from hf_reference import left_padded_batch


def _param_count(model: nnx.Module) -> int:
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_prefill_then_decode_equals_full_forward():
  cfg = config_lib.tiny()
  model = init_model(cfg, seed=7)
  steps, prompt_len = 5, 9
  ids, mask = left_padded_batch(np.random.default_rng(0), [9, 4, 6], prompt_len + steps)
  # Rows are left-padded prompts followed by `steps` generated tokens (all real).
  ids = np.concatenate([ids[:, steps:], np.random.default_rng(1).integers(0, 1000, (3, steps))], 1)
  mask = np.concatenate([mask[:, steps:], np.ones((3, steps), np.int64)], 1)
  full = np.asarray(model(ids, mask))

  # The prefill attends to the prompt alone (not to the new cache's empty slots).
  out = nnx.jit(lambda m, i, a: m.prefill(i, a, cache_length=32))(
      model, ids[:, :prompt_len], mask[:, :prompt_len])
  real = mask[:, :prompt_len].astype(bool)
  np.testing.assert_allclose(np.asarray(out.logits)[real], full[:, :prompt_len][real], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out.cache.valid)[:, :prompt_len], real)
  assert not np.asarray(out.cache.valid)[:, prompt_len:].any()
  assert int(out.cache.index) == prompt_len
  # Decode steps over the cache, the layers unrolled, continue the full forward.
  decode = nnx.jit(lambda m, i, c, p: m.decode_step(i, c, p, layers=m.decode_layers()))
  cache, deltas = out.cache, out.rope_deltas
  num_real = jnp.asarray(mask[:, :prompt_len].sum(1), jnp.int32)
  for k in range(steps):
    pos = rope.decode_positions(num_real + k, deltas)
    step = decode(model, ids[:, prompt_len + k:prompt_len + k + 1], cache, pos)
    cache = step.cache
    np.testing.assert_allclose(np.asarray(step.logits)[:, 0], full[:, prompt_len + k], atol=1e-5,
                               err_msg=f"decode step {k}")
  assert int(cache.index) == prompt_len + steps
  # The prompts with their continuations in one pass over the layers give the same logits.
  last, after = nnx.jit(lambda m, p, pm, i, a: m.with_prompt(p, pm, None, None, i, a, share=1))(
      model, ids[:, :prompt_len], mask[:, :prompt_len], ids[:, prompt_len:], mask[:, prompt_len:])
  np.testing.assert_allclose(np.asarray(last)[:, 0], full[:, prompt_len - 1], atol=1e-5)
  np.testing.assert_allclose(np.asarray(after), full[:, prompt_len:], atol=1e-5)


@pytest.mark.parametrize("preset, want", [("qwen2_5_vl_3b", 3_754_622_976),
                                          ("qwen2_5_vl_7b", 8_292_166_656)])
def test_parameter_count_of_real_presets(preset, want):
  cfg = config_lib.PRESETS[preset]()
  model = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
  assert _param_count(model) == want


@pytest.mark.parametrize("preset", ["qwen2_5_vl_3b", "qwen2_5_vl_7b"])
def test_parameter_count_matches_hf_per_component(preset):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = config_lib.PRESETS[preset]()
  with torch.device("meta"):
    hf = transformers.Qwen2_5_VLForConditionalGeneration(
        transformers.Qwen2_5_VLConfig(**config_lib.to_hf_config(cfg)))
  model = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
  hf_vision = sum(p.numel() for n, p in hf.named_parameters() if ".visual." in n)
  assert _param_count(model.vision) == hf_vision
  assert _param_count(model) == sum(p.numel() for p in hf.parameters())


def test_init_model_is_seeded_host_random_with_hf_init_scales():
  cfg = config_lib.tiny()
  a, b, c = init_model(cfg, seed=1), init_model(cfg, seed=1), init_model(cfg, seed=2)
  q = np.asarray(a.text.layers.attn.q[...])
  np.testing.assert_array_equal(q, np.asarray(b.text.layers.attn.q[...]))
  assert not np.array_equal(q, np.asarray(c.text.layers.attn.q[...]))
  assert abs(q.std() - 0.02) < 1e-3
  assert not np.array_equal(q[0], q[1])  # stacked layers are drawn independently
  np.testing.assert_array_equal(np.asarray(a.text.final_norm.scale[...]), 1.0)
  np.testing.assert_array_equal(np.asarray(a.text.layers.attn.k_bias[...]), 0.0)
