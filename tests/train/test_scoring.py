"""Scoring: per-token log-probabilities and entropy from logits (fp32 whatever the logits'
dtype), the chunked LM head, and completions scored after a shared prompt pass, packed or not."""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from robot_r1_jax.launch import hlo
from robot_r1_jax.model import config as config_lib
from robot_r1_jax.model import sharding
from robot_r1_jax.model.qwen2_5_vl import Qwen25VL, init_model
from robot_r1_jax.train import scoring
from robot_r1_jax.train.scoring import Sequences, sequence_log_probs

from testing import grouped_rows, make_mesh, two_questions


def test_token_log_probs_and_entropy_hand_computed():
  # Position 0: probabilities [1/4, 3/4, 0] (a −inf logit); position 1: uniform over 3.
  logits = jnp.array([[[0.0, math.log(3.0), -jnp.inf], [0.0, 0.0, 0.0]]])
  targets = jnp.array([[1, 2]])
  np.testing.assert_allclose(scoring.token_log_probs(logits, targets), [[-0.2876821, -1.0986123]],
                             rtol=1e-6)
  # −(1/4·ln 1/4 + 3/4·ln 3/4) = 0.5623351; ln 3 = 1.0986123.
  np.testing.assert_allclose(scoring.token_entropy(logits), [[0.5623351, 1.0986123]], rtol=1e-6)
  grad = jax.grad(lambda x: scoring.token_entropy(x).sum())(logits)
  assert np.isfinite(grad).all()


def test_token_log_probs_are_fp32_log_softmax_for_bf16_logits():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(4 * rng.normal(size=(2, 3, 50)), jnp.bfloat16)
  targets = jnp.asarray(rng.integers(0, 50, (2, 3)))
  out = scoring.token_log_probs(logits, targets)
  assert out.dtype == jnp.float32
  reference = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)),
                                  targets[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(out, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_token_log_probs_materialise_at_most_one_fp32_logits_array(dtype):
  b, t, v = 4, 64, 4096
  compiled = jax.jit(scoring.token_log_probs).lower(
      jax.ShapeDtypeStruct((b, t, v), dtype), jax.ShapeDtypeStruct((b, t), jnp.int32)).compile()
  one_fp32_logits = b * t * v * 4
  # One [B, T, V] f32 array (the bf16 upcast) plus a few [B, T] vectors at most.
  assert compiled.memory_analysis().temp_size_in_bytes <= one_fp32_logits + 16 * b * t * 4


def test_token_log_probs_rejects_mismatched_targets():
  with pytest.raises(ValueError, match=r"logits \(1, 2, 3\) and targets \(1, 3\)"):
    scoring.token_log_probs(jnp.zeros((1, 2, 3)), jnp.zeros((1, 3), jnp.int32))


def _head_problem(b=3, r=11, d=7, v=293, seed=2):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(b, r, d)), jnp.float32)
  weight = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, r)), jnp.int32)
  return hidden, weight, targets


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_scores_in_chunks_equal_the_whole_head_with_gradients(temperature):
  hidden, weight, targets = _head_problem()

  def total(h, w, chunk):
    logp, entropy = scoring.head_scores(w, h, targets, temperature, chunk)
    return (logp * jnp.linspace(0.5, 1.5, logp.size).reshape(logp.shape)).sum() + entropy.sum(), (
        logp, entropy)

  grad = jax.jit(jax.grad(total, argnums=(0, 1), has_aux=True), static_argnums=2)
  (gh_whole, gw_whole), (logp_whole, ent_whole) = grad(hidden, weight, 11)
  (gh, gw), (logp, ent) = grad(hidden, weight, 4)  # 3 chunks, the last one padded
  # Relative: the chunks' head matmuls round differently by up to an ulp of values near −17.
  np.testing.assert_allclose(logp, logp_whole, rtol=1e-6, atol=0)
  np.testing.assert_allclose(ent, ent_whole, rtol=1e-6, atol=0)
  for a, b in ((gh, gh_whole), (gw, gw_whole)):
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_head_scores_hold_one_chunk_of_logits_in_the_backward_pass():
  b, r, d, v = 4, 64, 16, 4099
  one_fp32_logits = b * r * v * 4

  def temps(chunk):
    loss = lambda h, w, t: scoring.head_scores(w, h, t, 1.0, chunk)[0].sum()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
        jax.ShapeDtypeStruct((b, r, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((b, r), jnp.int32)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  whole, chunked = temps(r), temps(8)
  assert whole >= one_fp32_logits  # the whole head keeps [B, R, V] for its backward
  # 8 of 64 positions at a time: the logits and their gradient for one chunk, the [D, V] weight
  # gradient and a few [B, R] vectors.
  assert chunked <= one_fp32_logits / 8 * 3 + d * v * 4 * 2 + 16 * b * r * 4


def test_head_scores_on_a_mesh_move_hidden_states_not_the_head(mesh8):
  """FSDP-placed head (D over fsdp, V over tensor) and rows over (data, fsdp): the scores and
  gradients equal one device's, and no collective inside the chunk loop is of the head's size."""
  b, r, d, v = 8, 24, 32, 8 * 1031  # V splits over the 8 devices
  rng = np.random.default_rng(3)
  hidden = jnp.asarray(rng.normal(size=(b, r, d)), jnp.float32)
  weight = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, r)), jnp.int32)

  def loss(h, w):
    logp, entropy = scoring.head_scores(w, h, targets, 1.0, 8)
    return logp.sum() + 0.5 * entropy.sum(), logp

  grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
  (gh_one, gw_one), logp_one = grad(hidden, weight)
  place = lambda x, names: jax.device_put(x, NamedSharding(mesh8, sharding.logical_to_spec(names)))
  placed = place(hidden, ("batch", None, None)), place(weight, ("embed", "vocab"))
  with sharding.on_mesh(mesh8):
    (gh, gw), logp = grad(*placed)
    text = grad.lower(*placed).compile().as_text()
  np.testing.assert_allclose(logp, logp_one, rtol=1e-6)
  # Each device sums its part of V: f32 rounding of a different order.
  for got, want in ((gh, gh_one), (gw, gw_one)):
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
  loops = [loop for loop in hlo.loop_collectives(text) if loop.counts]
  assert loops  # the chunks' hidden states and sums do move
  head_bytes = d * v * 4 // 8  # a quarter of the head: any FSDP gather of it is larger
  assert all(loop.total_bytes < head_bytes for loop in loops), [l.summary() for l in loops]


def test_head_scores_rejects_mismatched_targets():
  with pytest.raises(ValueError, match=r"hidden \(1, 2, 3\) and targets \(1, 3\)"):
    scoring.head_scores(jnp.zeros((3, 5)), jnp.zeros((1, 2, 3)), jnp.zeros((1, 3), jnp.int32))


@pytest.fixture(scope="module")
def batch(tokenizer):
  return two_questions(tokenizer)


def test_shared_prompt_scoring_gives_the_whole_row_log_probs_and_gradients(tokenizer, batch):
  """One prompt pass per run of `share` rows is the whole-row forward, to float rounding, in
  value and in gradient, while costing far fewer FLOPs."""
  seqs = grouped_rows(tokenizer, batch, g=3)
  grid = tuple(int(v) for v in batch.image_grid_thw[0])
  graphdef, params = nnx.split(init_model(config_lib.tiny(), seed=0), nnx.Param)
  mask = jnp.asarray(seqs.completion_mask, jnp.float32)

  def score(p, share):
    logp, entropy = sequence_log_probs(nnx.merge(graphdef, p), seqs, grid, 0.7, share)
    return jnp.sum(logp * mask * jnp.arange(1, mask.shape[0] + 1)[:, None]), (logp, entropy)

  grad = jax.jit(jax.grad(score, has_aux=True), static_argnums=1)
  (whole_grad, (whole_logp, whole_entropy)) = grad(params, 1)
  (shared_grad, (shared_logp, shared_entropy)) = grad(params, 3)
  np.testing.assert_allclose(shared_logp, whole_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(shared_entropy, whole_entropy, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(whole_logp)[seqs.completion_mask == 1] < 0)
  for got, want in zip(jax.tree.leaves(shared_grad), jax.tree.leaves(whole_grad)):
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
  flops = lambda share: grad.lower(params, share).compile().cost_analysis()["flops"]
  assert flops(3) < 0.6 * flops(1)
  with pytest.raises(ValueError, match="runs of share=4"):
    sequence_log_probs(nnx.merge(graphdef, params), seqs, grid, 1.0, 4)


@pytest.mark.parametrize("fsdp, share", [(1, 3), (2, 3), (1, 1)])
def test_packed_completions_score_what_padded_ones_do(tokenizer, batch, fsdp, share):
  """Completions packed into each batch shard's real tokens give the padded pass's log-probs,
  entropy and gradients (f32), for fewer FLOPs; positions past a completion score 0. With
  share=1 the padded pass is the whole-row forward and the packed one runs each row's prompt
  first."""
  seqs = grouped_rows(tokenizer, batch, g=3)
  grid = tuple(int(v) for v in batch.image_grid_thw[0])
  mesh = make_mesh(fsdp=fsdp)
  graphdef, params = nnx.split(init_model(config_lib.tiny(), seed=0, mesh=mesh), nnx.Param)
  mask = jnp.asarray(seqs.completion_mask, jnp.float32)
  # The fullest shard's real chunk tokens: the fewest rows a packing may take.
  rows = int(seqs.completion_mask[:, :-1].reshape(fsdp, -1).sum(1).max())
  assert rows < seqs.completion_mask[:, :-1].size // fsdp

  def score(p, packed_rows):
    logp, entropy = sequence_log_probs(nnx.merge(graphdef, p), seqs, grid, 0.7, share,
                                       packed_rows=packed_rows, entropy_grad=True)
    weights = mask * jnp.arange(1, mask.shape[0] + 1)[:, None]
    return jnp.sum((logp + 0.1 * entropy) * weights), (logp, entropy)

  grad = jax.jit(jax.grad(score, has_aux=True), static_argnums=1)
  with sharding.on_mesh(mesh):
    padded_grad, (padded_logp, padded_entropy) = grad(params, None)
    packed_grad, (packed_logp, packed_entropy) = grad(params, rows)
    flops = lambda packed_rows: grad.lower(params, packed_rows).compile().cost_analysis()["flops"]
    # With share=1 every row's image goes through the tower again, which packing leaves alone.
    assert flops(rows) < (0.9 if share > 1 else 0.97) * flops(None)
  real = seqs.completion_mask == 1
  for got, want in ((packed_logp, padded_logp), (packed_entropy, padded_entropy)):
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5,
                               atol=1e-5)
  assert np.all(np.asarray(packed_logp)[:, 1:][seqs.completion_mask[:, :-1] == 0] == 0)
  for got, want in zip(jax.tree.leaves(packed_grad), jax.tree.leaves(padded_grad)):
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_packed_rows_for_counts_each_shard_of_each_micro_batch():
  """The most real chunk tokens (a completion's length less its last token) of any shard of any
  micro-batch, rounded up to a step of the shard's slots."""
  lengths = np.array([[10, 20, 30, 40], [200, 150, 5, 5]])  # M=2 micro-batches of 4 rows
  mask = (np.arange(257)[None, None] < lengths[..., None]).astype(np.int32)
  # Shards of 2 rows × 256 chunk slots: the fullest holds 199 + 149 = 348 tokens, steps of 128.
  assert scoring.packed_rows_for(jnp.asarray(mask), 2, 4) == 384
  assert scoring.packed_rows_for(jnp.asarray(mask[1]), 2, 4) == 384
  assert scoring.packed_rows_for(jnp.asarray(mask[0]), 2, 4) == 128
  assert scoring.packed_rows_for(jnp.asarray(mask), 1, 4) == 512  # 348 + 4 + 4, steps of 256
  assert scoring.packed_rows_for(jnp.asarray(mask), 2, 1) is None  # one step: the padded rows
  assert scoring.packed_rows_for(jnp.asarray(mask[..., :1]), 2, 4) is None  # no chunk


def test_shared_prompt_scoring_of_one_token_completions(tokenizer, batch):
  """With one completion token there is no chunk after the prompt: its last position alone
  predicts it, as in the whole-row forward."""
  seqs = grouped_rows(tokenizer, batch, g=3)
  seqs = dataclasses.replace(seqs, completion=seqs.completion[:, :1],
                             completion_mask=np.ones_like(seqs.completion_mask[:, :1]))
  grid = tuple(int(v) for v in batch.image_grid_thw[0])
  model = init_model(config_lib.tiny(), seed=0)
  whole, shared = (sequence_log_probs(model, seqs, grid, 0.7, share) for share in (1, 3))
  assert shared[0].shape == (len(seqs.completion), 1)
  for got, want in zip(shared, whole):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share", [1, 3])
def test_remat_and_the_chunked_head_change_no_log_prob_or_gradient(tokenizer, batch, share):
  """Recomputing the decoder layers in the backward pass, and applying the LM head 2 positions at
  a time, give the plain pass's log-probs and gradients (f32)."""
  seqs = grouped_rows(tokenizer, batch, g=3)
  grid = tuple(int(v) for v in batch.image_grid_thw[0])
  mask = jnp.asarray(seqs.completion_mask, jnp.float32)

  def grads(remat, chunk):
    graphdef, params = nnx.split(init_model(config_lib.tiny(), seed=0, remat=remat), nnx.Param)

    def score(p):
      logp, _ = sequence_log_probs(nnx.merge(graphdef, p), seqs, grid, 0.7, share, chunk)
      return jnp.sum(logp * mask), logp

    return jax.jit(jax.grad(score, has_aux=True))(params)

  plain_grad, plain_logp = grads(False, 256)
  for remat, chunk in ((True, 256), (False, 2)):
    grad, logp = grads(remat, chunk)
    np.testing.assert_allclose(logp, plain_logp, rtol=1e-6, atol=0)
    for got, want in zip(jax.tree.leaves(grad), jax.tree.leaves(plain_grad)):
      assert np.abs(got - want).max() <= 1e-6 * max(float(np.abs(want).max()), 1.0), (remat, chunk)


def test_the_backward_on_a_data_by_fsdp_mesh_never_gathers_the_whole_hidden_state():
  """The embedding lookup's rows reach the (data, fsdp) split through an all-to-all from the
  table's fsdp-split width. Without that step, on a mesh with data and fsdp > 1, XLA replicated
  the gradient of the whole [B, T, D] hidden state on every device (its SPMD partitioner warned
  "involuntary full rematerialization"): an all-gather of every row at full length."""
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  mesh = make_mesh(data=2, fsdp=4)
  graphdef, params = nnx.split(init_model(config_lib.tiny(), seed=0, mesh=mesh), nnx.Param)
  rows, t, r = 16, 24, 40
  rng = np.random.default_rng(0)
  ids = lambda n: rng.integers(5, 900, (rows, n)).astype(np.int32)
  seqs = jax.tree.map(lambda x: sharding.global_rows(x, mesh), Sequences(
      prompt_ids=ids(t), prompt_mask=np.ones((rows, t), np.int32), completion=ids(r),
      completion_mask=np.ones((rows, r), np.int32), pixel_values=None))
  score = lambda p: jnp.sum(sequence_log_probs(nnx.merge(graphdef, p), seqs, None)[0])
  with sharding.on_mesh(mesh):
    text = jax.jit(jax.grad(score)).lower(params).compile().as_text()
  gathered = re.findall(r"= \w+\[(\d+),(\d+),\d+\]\S* all-gather(?:-start)?\(", text)
  assert gathered, "expected the head's chunk gathers at least"
  assert (str(rows), str(t + r - 1)) not in gathered, gathered


def test_prefill_and_scoring_lower_to_cudnn_flash_attention_for_a_gpu(tokenizer, batch,
                                                                       monkeypatch):
  """`attention=cudnn`, lowered for CUDA on this CPU host: the prefill, and the scoring gradient
  (the update's) whole-row and packed after a shared prompt, call cuDNN's fused attention
  forward and backward in every attention of the model (text layers, vision windows and frames)
  and form no [T, S] scores of their own. The lengths are odd (cuDNN's masked backward needs even
  ones). jax asks the CUDA plugin for cuDNN's version before it lowers; this host has none, so
  the version jax's CUDA wheels bundle answers."""
  from jax._src.cudnn import fused_attention_stablehlo
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)
  tiny = config_lib.tiny()
  # cuDNN takes head dims that are multiples of 8 (the 7B's are 128 and 80): 16 in the tower.
  cfg = dataclasses.replace(tiny, vision=dataclasses.replace(tiny.vision, num_heads=3))
  model = nnx.eval_shape(lambda: Qwen25VL(cfg, dtype=jnp.bfloat16,
                                          attention_implementation="cudnn"))
  graphdef, params = nnx.split(model, nnx.Param)
  seqs = grouped_rows(tokenizer, batch, g=3, n=8)  # chunks of 7 after 64 prompt tokens
  grid = tuple(int(v) for v in batch.image_grid_thw[0])

  def kernels(fn, *args) -> collections.Counter:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert not re.search(r"tensor<\d+x\d+x\d+x(\d+)x\1xf32>", text)  # no square f32 scores
    return collections.Counter(re.findall(r'custom_call @__cudnn\$(fmha\w*)', text))

  prefill = lambda p: nnx.merge(graphdef, p).prefill(
      jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask),
      jnp.asarray(batch.pixel_values, jnp.float32), (grid,) * 2, cache_length=96).logits
  # The text layers' (padded: the mask goes in as a bias), the vision windows' and frames' (one
  # whole window per image here, no padding): one call each.
  assert kernels(prefill, params) == {"fmhaScaleBiasSoftmax": 1, "fmhaSoftmax": 2}

  def score(p, share, packed_rows):
    logp, _ = sequence_log_probs(nnx.merge(graphdef, p), seqs, grid, 0.7, share,
                                 packed_rows=packed_rows)
    return logp.sum()

  # Forward and backward of each attention: the text layers' (with share 3, the prompt's and the
  # completions' after it), the vision windows' and frames'.
  for share, packed_rows, text in ((1, None, 1), (3, 16, 2)):
    found = kernels(jax.grad(lambda p: score(p, share, packed_rows)), params)
    assert found == {"fmhaScaleBiasSoftmax": text, "fmhaScaleBiasSoftmaxBackward": text,
                     "fmhaSoftmax": 2, "fmhaSoftmaxBackward": 2}, found
  with pytest.raises(ValueError, match="--compute_dtype=bfloat16"):
    Qwen25VL(cfg, attention_implementation="cudnn")
