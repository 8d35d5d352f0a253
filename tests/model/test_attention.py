"""The attention seam: the splash kernel (through the Pallas interpreter on CPU) and the
`jax.nn.dot_product_attention` call that cudnn makes (with the library's XLA implementation on
CPU) against the xla form on the masks the model uses (causal, left and right padding, a prompt
prefix, window groups), values and gradients, on one device and in a shard_map over the
fake-device mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from robot_r1_jax.model import attention, config as config_lib, qwen2_5_vl, sharding
from testing import make_mesh

# Prime-ish sizes: 3 kv heads of 2 query heads each, lengths off the kernel's 128-row blocks.
B, K, Q, H = 4, 3, 2, 16
T, S = 37, 53


def _inputs(seed: int, t: int = T):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q, k, v = f(B, K, Q, t, H), f(B, K, H, t), f(B, K, t, H)
  # Row 0 all real, rows 1-2 left-padded (a prompt), row 3 right-padded (a completion).
  real = np.ones((B, t), bool)
  real[1, :5], real[2, :t - 3], real[3, t - 11:] = False, False, False
  prefix_valid = np.ones((B, S), bool)
  prefix_valid[1, :7], prefix_valid[2, S - 4:] = False, False  # padding, and unfilled slots
  prefix = attention.Prefix(k=f(B, K, H, S), v=f(B, K, S, H), valid=jnp.asarray(prefix_valid))
  return q, k, v, jnp.asarray(real), prefix


def _real_rows(x, real):
  """x [B, K, Q, T, H] at the real queries only (padding queries are finite and unused)."""
  return np.asarray(x).transpose(0, 3, 1, 2, 4)[np.asarray(real)]


@pytest.mark.parametrize("impl", ["splash_interpret", "dot_product"])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_kernels_match_xla_values_and_gradients(with_prefix, impl):
  q, k, v, real, prefix = _inputs(0)
  prefix = prefix if with_prefix else None
  weights = jnp.asarray(np.random.default_rng(1).standard_normal((B, K, Q, T, H)), jnp.float32)

  def loss(impl, q, k, v, cached):
    before = None if cached is None else attention.Prefix(*cached, valid=prefix.valid)
    out = attention.causal(q, k, v, real, before, impl)
    return (out * weights * real[:, None, None, :, None]).sum(), out

  cached = None if prefix is None else (prefix.k, prefix.v)
  results = {}
  for name in ("xla", impl):
    grad = jax.jit(jax.grad(lambda *a, name=name: loss(name, *a), argnums=(0, 1, 2, 3),
                            has_aux=True))
    results[name] = grad(q, k, v, cached)
  (g_xla, out_xla), (g_splash, out_splash) = results["xla"], results[impl]
  assert np.isfinite(np.asarray(out_splash)).all()
  np.testing.assert_allclose(_real_rows(out_splash, real), _real_rows(out_xla, real), atol=2e-6)
  for a, b in zip(jax.tree.leaves(g_splash), jax.tree.leaves(g_xla)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


_ON_GPU = pytest.mark.skipif(jax.default_backend() != "gpu",
                             reason="cuDNN runs on a GPU: JAX_PLATFORMS=cuda pytest -k bf16")


@pytest.mark.parametrize("impl", ["dot_product", pytest.param("cudnn", marks=_ON_GPU)])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_the_library_call_in_bf16_is_as_close_to_f32_as_xla_in_bf16(with_prefix, impl):
  """cuDNN computes in bf16 (blockwise, its own accumulation order), so it cannot equal xla to
  f32 rounding: against the f32 xla result, its values and gradients may be off by no more than
  twice what xla's own bf16 pass is. Odd lengths (T 37, S 53 + 37): the padding to even runs.
  On CPU `dot_product` takes the same call with the library's XLA implementation."""
  q, k, v, real, prefix = _inputs(6)
  weights = jnp.asarray(np.random.default_rng(7).standard_normal((B, K, Q, T, H)), jnp.float32)
  keep = real[:, None, None, :, None]

  def grads(impl, dtype):
    cast = lambda x: x.astype(dtype)
    before = attention.Prefix(cast(prefix.k), cast(prefix.v), prefix.valid) if with_prefix else None

    def loss(q, k, v):
      out = attention.causal(q, k, v, real, before, impl).astype(jnp.float32)
      return (out * weights * keep).sum(), out

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(cast(q), cast(k), cast(v))

  want_grads, want = grads("xla", jnp.float32)
  error = lambda got: [float(np.abs(np.asarray(a, np.float32) - np.asarray(b)).max())
                       for a, b in zip([_real_rows(got[1], real)] + list(got[0]),
                                       [_real_rows(want, real)] + list(want_grads))]
  reference, measured = error(grads("xla", jnp.bfloat16)), error(grads(impl, jnp.bfloat16))
  assert all(0 < r < 0.1 for r in reference), reference  # bf16 rounding, not a broken pass
  for got, bound in zip(measured, reference):
    assert got <= 2 * bound, (measured, reference)


def test_a_prefix_shared_by_g_rows_is_attention_over_the_keys_side_by_side():
  """dense over a cached prefix that G = 3 consecutive rows share (their queries one product
  with its keys, regrouped there and back) equals one softmax over the keys side by side,
  values and gradients, including a query that sees nothing."""
  g = 3
  rng = np.random.default_rng(5)
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q, k, v = f(B * g, K, Q, T, H), f(B * g, K, H, T), f(B * g, K, T, H)
  _, _, _, real, prefix = _inputs(4)
  mask = attention.causal_mask(jnp.repeat(real, g, 0), jnp.repeat(prefix.valid, g, 0))
  mask = mask.at[4, 9].set(False)
  cached = (prefix.k, prefix.v)

  def side_by_side(q, k, v, cached):
    keys = jnp.concatenate([jnp.repeat(cached[0], g, 0), k], axis=-1)
    return attention.dense(q, keys, jnp.concatenate([jnp.repeat(cached[1], g, 0), v], 2), mask)

  weights = f(B * g, K, Q, T, H)
  results = [jax.jit(jax.value_and_grad(lambda *a, fn=fn: (fn(*a) * weights).sum(),
                                        argnums=(0, 1, 2, 3)))(q, k, v, cached)
             for fn in (lambda q, k, v, c: attention.dense(q, k, v, mask, c), side_by_side)]
  (got, got_grads), (want, want_grads) = results
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  out = attention.dense(q, k, v, mask, cached)
  np.testing.assert_allclose(out, side_by_side(q, k, v, cached), atol=1e-6)
  # The query that sees nothing averages every value, as HF's softmax over a masked row.
  everything = jnp.concatenate([prefix.v[1], v[4]], axis=1).mean(1)
  np.testing.assert_allclose(out[4, :, :, 9], np.broadcast_to(everything[:, None], (K, Q, H)),
                             atol=1e-6)


def test_causal_mask_states_the_rule_once():
  real = jnp.asarray([[False, True, True]])
  mask = np.asarray(attention.causal_mask(real, jnp.asarray([[True, False]])))
  np.testing.assert_array_equal(mask[0], [[1, 0, 0, 0, 0],
                                          [1, 0, 0, 1, 0],
                                          [1, 0, 0, 1, 1]])


@pytest.mark.parametrize("impl", ["splash_interpret", "dot_product"])
def test_grouped_kernels_match_xla(impl):
  # 3 groups of 128 slots, the last one half padding (an irregular window table).
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 3, 128, 4, H)), jnp.float32) for _ in range(3))
  valid = np.ones((3, 128), bool)
  valid[2, 64:] = False
  xla = np.asarray(attention.grouped(q, k, v, valid, "xla"))
  out = np.asarray(jax.jit(lambda *a: attention.grouped(*a, valid, impl))(q, k, v))
  np.testing.assert_allclose(out[:, valid], xla[:, valid], atol=2e-6)


def test_splash_in_shard_map_over_the_mesh():
  # 8 fake devices as data 2 × tensor 4: rows split in two, and 6 query heads over tensor 4 do not
  # divide, nor do 3 kv heads: both stay whole. Then tensor 2: query heads split, kv heads
  # repeated to match.
  q, k, v, real, prefix = _inputs(3)
  want = _real_rows(attention.causal(q, k, v, real, prefix, "xla"), real)
  for data, tensor in ((2, 4), (4, 2)):
    mesh = make_mesh(data=data, tensor=tensor)
    with sharding.on_mesh(mesh):
      out = jax.jit(lambda *a: attention.causal(*a, "splash_interpret"))(q, k, v, real, prefix)
      text = jax.jit(lambda *a: attention.causal(*a, "splash_interpret")).lower(
          q, k, v, real, prefix).as_text()
    assert "shard_map" in text or "sdy.manual_computation" in text, (data, tensor)
    np.testing.assert_allclose(_real_rows(out, real), want, atol=2e-6)


def test_model_through_the_kernel_matches_xla():
  """The whole tiny model in the interpreter, an image per row (its 128-patch frames take the
  kernel, its 64-patch windows the xla form): logits and the gradient equal the xla model's."""
  cfg = config_lib.tiny()
  models = {impl: qwen2_5_vl.init_model(cfg, seed=0, attention_implementation=impl)
            for impl in ("xla", "splash_interpret")}
  rng = np.random.default_rng(4)
  grid = ((1, 8, 16),) * 2  # 128 patches, 32 merged tokens per image
  row = [0] * 4 + [cfg.vision_start_token_id] + [cfg.image_token_id] * 32 + [
      cfg.vision_end_token_id] + list(rng.integers(0, 1000, 9))
  ids = jnp.asarray([row, row[:-9] + list(rng.integers(0, 1000, 9))], jnp.int32)
  mask = jnp.asarray(np.concatenate([np.zeros((2, 4)), np.ones((2, len(row) - 4))], 1),
                     jnp.int32)
  pixels = jnp.asarray(rng.standard_normal((256, cfg.vision.patch_dim)), jnp.float32)

  def loss(model, ids, mask, pixels):
    logits = model(ids, mask, pixels, grid)
    return (logits[:, 4:].astype(jnp.float32)**2).mean(), logits

  graphdef, state = nnx.split(models["splash_interpret"])
  program = jax.make_jaxpr(lambda s, *a: loss(nnx.merge(graphdef, s), *a))(state, ids, mask,
                                                                          pixels)
  assert str(program).count("pallas_call") == 2  # the text layers' and the vision frames'
  out = {impl: nnx.jit(nnx.grad(loss, has_aux=True))(m, ids, mask, pixels)
         for impl, m in models.items()}
  (g_xla, l_xla), (g_splash, l_splash) = out["xla"], out["splash_interpret"]
  np.testing.assert_allclose(np.asarray(l_splash)[:, 4:], np.asarray(l_xla)[:, 4:], atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_splash), jax.tree.leaves(g_xla)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_model_through_the_library_call_matches_xla(monkeypatch):
  """The tiny model with every prefill, window and frame attention through
  `jax.nn.dot_product_attention` (XLA's implementation here; cudnn's on a GPU): the logits of
  the xla model, an image per row."""
  cfg = config_lib.tiny()
  models = {impl: qwen2_5_vl.init_model(cfg, seed=0, attention_implementation=impl)
            for impl in ("xla", "dot_product")}
  rng = np.random.default_rng(5)
  grid = ((1, 8, 8),)
  row = [0] * 3 + [cfg.vision_start_token_id] + [cfg.image_token_id] * 16 + [
      cfg.vision_end_token_id] + list(rng.integers(0, 1000, 7))
  ids = jnp.asarray([row], jnp.int32)
  mask = jnp.asarray([[0] * 3 + [1] * (len(row) - 3)], jnp.int32)
  pixels = jnp.asarray(rng.standard_normal((64, cfg.vision.patch_dim)), jnp.float32)
  calls, library = [], jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda *a, **kw: calls.append(kw["implementation"]) or library(*a, **kw))
  logits = {impl: np.asarray(m(ids, mask, pixels, grid))[:, 3:] for impl, m in models.items()}
  # Traced once per scanned body: the text layers, the vision windows, the vision frames.
  assert calls == [None] * 3
  np.testing.assert_allclose(logits["dot_product"], logits["xla"], atol=1e-5)


def test_resolve_and_refusals():
  assert attention.resolve("auto", "tpu") == "splash"
  assert attention.resolve("cudnn", "gpu") == "cudnn"
  for platform in ("cpu", "tpu"):
    with pytest.raises(ValueError, match="runs on GPUs"):
      attention.resolve("cudnn", platform)
  assert attention.resolve("auto", "cpu") == attention.resolve("auto", "gpu") == "xla"
  assert attention.resolve("splash_interpret", "cpu") == "splash_interpret"
  with pytest.raises(ValueError, match="flash"):
    attention.resolve("flash", "tpu")
  with pytest.raises(ValueError, match="attention_implementation='auto'"):
    qwen2_5_vl.Qwen25VL(config_lib.tiny(), attention_implementation="auto")
