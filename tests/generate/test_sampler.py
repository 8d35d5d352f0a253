"""The rollout sampler: HF greedy parity, log-probs, sampling statistics, G samples, sharding,
recompilation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robot_r1_jax.generate import sampling
from robot_r1_jax.generate.sampler import FinishReason, Sampler, SamplerConfig
from robot_r1_jax.launch import hlo
from robot_r1_jax.model import hf_io, packing, sharding
from robot_r1_jax.model.qwen2_5_vl import Qwen25VL, init_model

from hf_reference import build_hf, left_padded_batch, tiny_config
from testing import EOS, PAD, image_prompts as build_image_prompts, make_mesh, make_sampler

BUCKETS = dict(prompt_buckets=(16, 32, 64), new_token_buckets=(24, 48))


def _prompts(lengths=(13, 7, 10, 4), total=13, seed=0):
  return left_padded_batch(np.random.default_rng(seed), list(lengths), total)


@pytest.fixture(scope="module")
def model():
  return init_model(tiny_config(), seed=3)


@pytest.fixture(scope="module")
def image_prompts(tokenizer):
  """Three left-padded chat prompts of different lengths, each with a differently sized image."""
  rng = np.random.default_rng(6)
  prompts = build_image_prompts(tokenizer, [
      (text, rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for text, (h, w) in [
          ("Where is the cup?", (56, 56)),
          ("Move the gripper to the red block, then describe the path.", (84, 112)),
          ("Push the button.", (112, 112))]])
  return prompts.ids, prompts.mask, list(prompts.pixels), prompts.grids


@pytest.fixture(scope="module")
def sampler(model):
  """Temperature 1 with top-p 0.9 (the rollout setting, truncated a little more), G = 3."""
  return make_sampler(model, sampling=sampling.SamplingParams(top_p=0.9), num_samples=3,
                      **BUCKETS)


def _np(out):
  return jax.tree.map(np.asarray, out)


def _assert_same_samples(got, want):
  """The same tokens and lengths; log-probs equal up to summation order (~1e-6)."""
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.lengths, want.lengths)
  np.testing.assert_allclose(got.log_probs, want.log_probs, atol=2e-5)


def _check_layout(out, pad_id=0):
  """The mask covers the first `lengths` tokens; the rest is pad_id with zero log-probs."""
  n = out.tokens.shape[1]
  np.testing.assert_array_equal(out.mask, np.arange(n)[None] < out.lengths[:, None])
  assert (out.tokens[~out.mask] == pad_id).all()
  assert (out.log_probs[~out.mask] == 0).all()
  assert (out.log_probs[out.mask] <= 0).all()


# ---------------------------------------------------------------------------------------------
# Greedy decoding equals transformers' generate.


def _hf_generate(hf, ids, mask, max_new_tokens, stops, pixel_values=None, grids=None):
  """transformers' greedy generate → (new tokens [B, max_new_tokens], lengths up to the stop)."""
  import torch
  t_ids = torch.from_numpy(ids)
  images = {} if pixel_values is None else dict(
      pixel_values=torch.from_numpy(pixel_values), image_grid_thw=torch.tensor(grids))
  with torch.no_grad():
    # mm_token_type_ids: without it transformers silently falls back to 1-D positions.
    seq = hf.generate(input_ids=t_ids, attention_mask=torch.from_numpy(mask),
                      mm_token_type_ids=(t_ids == hf.config.image_token_id).int(), **images,
                      do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(stops),
                      pad_token_id=PAD)
  new = seq[:, ids.shape[1]:].numpy()
  lengths = []
  for row in new:
    ends = np.flatnonzero(np.isin(row, stops))
    lengths.append(ends[0] + 1 if ends.size else new.shape[1])
  return new, np.array(lengths)


def _sharp_hf(cfg, path):
  """Saves a random HF model with its text weights ×5 to `path`; returns a loader of fresh copies.

  With transformers' 0.02-std init the decoder is nearly a bigram model and greedy decoding after a
  chat prompt repeats one token; sharper weights give varied continuations, so every step is a
  different decision. transformers caches rope_deltas on the module: each generate gets a fresh one.
  """
  import torch
  transformers = pytest.importorskip("transformers")
  hf = build_hf(cfg, seed=5)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if p.ndim == 2 and "language_model" in name:
        p.mul_(5.0)
  hf.save_pretrained(path)
  return lambda: transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      path, attn_implementation="eager").eval()


def _mid_way_stop(free: np.ndarray) -> int:
  """A token that first appears in row 1 at step ≥ 8 and never in some other row."""
  for k in range(8, free.shape[1]):
    token = free[1, k]
    if token not in free[1, :k] and any(token not in row for row in free):
      return int(token)
  raise AssertionError(f"no mid-way stop token in {free}")


def _assert_greedy_matches_hf(tmp_path, cfg, tokenizer, ids, mask, pixel_values=None,
                              grids=None, new_tokens=40):
  """Greedy sampler == transformers' generate, with a stop token hit mid-way by some rows."""
  fresh_hf = _sharp_hf(cfg, tmp_path)
  _, ours = hf_io.load_hf(tmp_path)
  free, _ = _hf_generate(fresh_hf(), ids, mask, new_tokens, [EOS], pixel_values, grids)
  stops = (EOS, _mid_way_stop(free))
  want, want_lengths = _hf_generate(fresh_hf(), ids, mask, new_tokens, stops, pixel_values,
                                    grids)
  assert want_lengths.min() < new_tokens == want_lengths.max()

  greedy = make_sampler(ours, tokenizer, stop_tokens=stops,
                        sampling=sampling.SamplingParams(0.0), pad_id=0, **BUCKETS)
  out = greedy(ids, mask, jax.random.key(0), max_new_tokens=new_tokens,
               pixel_values=pixel_values, image_grid_thw=grids)
  got = _np(out)
  np.testing.assert_array_equal(got.lengths, want_lengths)
  for row, n in enumerate(want_lengths):
    np.testing.assert_array_equal(got.tokens[row, :n], want[row, :n], err_msg=f"row {row}")
  stopped = want_lengths < new_tokens
  np.testing.assert_array_equal(got.finish_reasons,
                                np.where(stopped, FinishReason.STOP, FinishReason.LENGTH))
  _check_layout(got)
  # Text: the completion up to its end with special tokens dropped; an ordinary stop token stays.
  for row, n in enumerate(want_lengths):
    assert out.text[row] == tokenizer.decode(want[row, :n].tolist(), skip_special_tokens=True)


def test_greedy_equals_hf_generate_left_padded(tmp_path, tokenizer):
  pytest.importorskip("torch")
  ids, mask = _prompts()
  _assert_greedy_matches_hf(tmp_path, tiny_config(), tokenizer, ids, mask)


def test_greedy_equals_hf_generate_with_images(tmp_path, tokenizer, image_prompts):
  pytest.importorskip("torch")
  ids, mask, pixels, grids = image_prompts
  assert len(set(mask.sum(1))) == 3 and len(set(grids)) == 3
  _assert_greedy_matches_hf(tmp_path, tiny_config(tie=False), tokenizer, ids, mask,
                            np.concatenate(pixels), grids)


# ---------------------------------------------------------------------------------------------
# Log-probs equal a fresh forward over prompt + completion.


def _fresh_log_probs(model, out, temperature, pixel_values=None, grids=None):
  """log softmax(logits / τ) of each completion token from one forward over prompt + completion,
  with positions from the token ids (and image grids) alone, as any trainer would compute them."""
  ids = np.concatenate([out.prompt_tokens, out.tokens], axis=1)
  mask = np.concatenate([out.prompt_mask, out.mask], axis=1).astype(np.int32)
  if grids is not None:
    # A sampled <|image_pad|> id would read as an image slot here (the sampler embedded it as text).
    assert not (out.tokens[out.mask] == model.cfg.image_token_id).any()
  logits = np.asarray(model(ids, mask, pixel_values, grids), np.float64) / temperature
  t = out.prompt_tokens.shape[1]
  # Position t - 1 + k predicts completion token k.
  logits = logits[:, t - 1:-1]
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  picked = np.take_along_axis(logits, out.tokens[..., None], axis=-1)[..., 0]
  return picked - log_z


def test_log_probs_equal_fresh_forward_at_temperature_one(model, sampler):
  ids, mask = _prompts()
  out = _np(sampler(ids, mask, jax.random.key(1), max_new_tokens=20))
  assert out.tokens.shape == (12, 24) and out.prompt_tokens.shape == (12, 16)
  _check_layout(out)
  want = _fresh_log_probs(model, out, 1.0)
  np.testing.assert_allclose(out.log_probs[out.mask], want[out.mask], atol=1e-4, rtol=0)


def test_log_probs_equal_fresh_forward_with_images(image_prompts):
  ids, mask, pixels, grids = image_prompts
  model = init_model(tiny_config(tie=False), seed=8)
  g = 2
  images = make_sampler(model, sampling=sampling.SamplingParams(top_p=0.9), num_samples=g,
                        **BUCKETS)
  out = _np(images(ids, mask, jax.random.key(5), max_new_tokens=24,
                   pixel_values=np.concatenate(pixels), image_grid_thw=grids))
  _check_layout(out)
  # Row b·G + g samples prompt b: its image, repeated G times, in row order.
  row_pixels = np.concatenate([pv for pv in pixels for _ in range(g)])
  row_grids = tuple(grid for grid in grids for _ in range(g))
  want = _fresh_log_probs(model, out, 1.0, row_pixels, row_grids)
  np.testing.assert_allclose(out.log_probs[out.mask], want[out.mask], atol=1e-4, rtol=0)


def test_log_probs_are_tempered_untruncated(model):
  """τ ≠ 1: log softmax(logits / τ) over the whole vocabulary, whatever top-k/top-p kept."""
  params = sampling.SamplingParams(temperature=0.7, top_k=50, top_p=0.95)
  tempered = make_sampler(model, sampling=params, num_samples=2, **BUCKETS)
  ids, mask = _prompts(seed=1)
  out = _np(tempered(ids, mask, jax.random.key(2), max_new_tokens=24))
  want = _fresh_log_probs(model, out, 0.7)
  np.testing.assert_allclose(out.log_probs[out.mask], want[out.mask], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Sampling statistics on controlled distributions.

PROBS = np.array([0.35, 0.25, 0.15, 0.12, 0.08, 0.05])  # over tokens 0..5; token 6, 7 impossible
LOGITS = np.concatenate([np.log(PROBS), [-np.inf, -np.inf]])


def _assert_frequencies(tokens, expected, vocab):
  """Each token's count within 5σ of its binomial expectation; tokens of probability 0 never drawn.

  Draws are deterministic given the key; 5σ on ≤ 8 categories makes a false alarm ≈ 5e-6.
  """
  n = tokens.size
  counts = np.bincount(tokens.ravel(), minlength=vocab)
  for tok, p in enumerate(expected):
    if p == 0:
      assert counts[tok] == 0, (tok, counts)
    else:
      assert abs(counts[tok] - n * p) <= 5 * np.sqrt(n * p * (1 - p)), (tok, counts[tok], n * p)


def _tempered(temperature):
  q = PROBS ** (1 / temperature)
  return q / q.sum()


def _renormalised(probs, kept):
  out = np.zeros(len(LOGITS))
  out[:kept] = probs[:kept] / probs[:kept].sum()
  return out


@pytest.mark.parametrize("params, expected", [
    (sampling.SamplingParams(), _renormalised(PROBS, 6)),
    (sampling.SamplingParams(temperature=1.6), _renormalised(_tempered(1.6), 6)),
    (sampling.SamplingParams(top_k=3), _renormalised(PROBS, 3)),
    # Masses before each token: 0, .35, .60, .75, .87 → tokens 0..3 are below 0.8.
    (sampling.SamplingParams(top_p=0.8), _renormalised(PROBS, 4)),
    # A top-p that the top token alone reaches keeps only it.
    (sampling.SamplingParams(top_p=0.3), _renormalised(PROBS, 1)),
], ids=["plain", "temperature", "top_k", "top_p", "top_p_single"])
def test_choose_frequencies(params, expected):
  n = 40_000
  logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (n, len(LOGITS)))
  choice = jax.jit(sampling.choose, static_argnums=2)(logits, jax.random.split(jax.random.key(7), n),
                                                      params)
  _assert_frequencies(np.asarray(choice.tokens), expected, len(LOGITS))
  tempered = LOGITS / params.temperature
  want = tempered - np.log(np.exp(tempered[:6]).sum())
  np.testing.assert_allclose(np.asarray(choice.log_probs), want[np.asarray(choice.tokens)],
                             rtol=1e-6)


def test_choose_greedy():
  logits = jnp.asarray([[0.1, 2.0, -1.0], [3.0, 2.9, 0.0]], jnp.float32)
  choice = sampling.choose(logits, jax.random.split(jax.random.key(0), 2),
                           sampling.SamplingParams(temperature=0.0))
  np.testing.assert_array_equal(np.asarray(choice.tokens), [1, 0])
  want = jax.nn.log_softmax(logits)[jnp.arange(2), choice.tokens]
  np.testing.assert_allclose(np.asarray(choice.log_probs), np.asarray(want), rtol=1e-6)


@pytest.mark.parametrize("parts", [1, 2, 5])
def test_inverse_cdf_draws_the_token_where_u_falls_row_by_row(parts):
  """Token i of a row is where u · Σw falls in the running sum (numpy's searchsorted in f64),
  across block boundaries and in the vocabulary's ragged last block (blocks of 128, or of 32 and
  64 within 2 and 5 vocabulary shards); a zero weight is never drawn, at u = 0 or at the largest
  u below 1; a row's token does not depend on the other rows."""
  rng = np.random.default_rng(0)
  weights = rng.exponential(size=(64, 320)).astype(np.float32)
  weights[:, :5] = 0  # u = 0 must skip the leading zeros
  weights[::4, 130:] = 0  # rows whose mass ends inside the second block
  weights[1, 319] = 50.0  # most of a row's mass in the last, ragged block
  u = rng.uniform(size=64).astype(np.float32)
  u[:2] = [0.0, np.nextafter(np.float32(1), np.float32(0))]
  draw = jax.jit(sampling.inverse_cdf, static_argnums=2)
  tokens = np.asarray(draw(weights, u, parts))
  ends = np.cumsum(weights.astype(np.float64), axis=1)
  want = [np.searchsorted(row, x * row[-1], side="right") for row, x in zip(ends, u)]
  np.testing.assert_array_equal(tokens, want)
  assert (weights[np.arange(64), tokens] > 0).all()
  assert int(draw(weights[5:6], u[5:6], parts)[0]) == tokens[5]


def test_a_draw_over_a_split_vocabulary_gathers_only_block_sums():
  """With V split over the tensor axis (as the LM head leaves it), the draw's blocks lie within
  a shard: no collective moves [rows, V] logits, only [rows, V / block] block sums (a block that
  straddled two shards, 128 here, made XLA gather every row's whole vocabulary), and the tokens
  are the unsplit draw's. Qwen's 151936 over 2 and 4 shards draws in blocks of 64 and 32."""
  assert [sampling._block(151936, n) for n in (1, 2, 4)] == [128, 64, 32]
  assert sampling._block(1031, 2) == sampling._block(2 * 1031, 2) == 128  # no shard, or odd ones
  rows, v = 16, 2 * 64 * 37  # shards of 37 blocks of 64: blocks of 128 would straddle
  mesh = make_mesh(tensor=2)
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "tensor"))
  logits = jax.device_put(jax.random.normal(jax.random.key(3), (rows, v)) * 3, split)
  keys = jax.random.split(jax.random.key(4), rows)
  params = sampling.SamplingParams(top_p=0.9)
  moved, tokens = {}, {}  # parts → the largest collective's bytes, the drawn tokens
  for parts in (1, 2):
    choose = jax.jit(lambda l, k, parts=parts: sampling.choose(l, k, params, parts))
    text = choose.lower(logits, keys).compile().as_text()
    moved[parts] = max((hlo._bytes(i.type) for c in hlo.parse(text).computations.values()
                        for i in c.instructions.values() if i.opcode.startswith(hlo.KINDS)),
                       default=0)
    tokens[parts] = np.asarray(choose(logits, keys).tokens)
  assert moved[1] >= rows * v * 4  # the whole f32 logits, gathered
  assert moved[2] <= rows * (v // 64) * 4
  np.testing.assert_array_equal(tokens[2], tokens[1])


def test_choose_draws_each_row_from_its_own_key():
  """A row's token follows its key alone (not its neighbours, the batch size or its place in
  it); another key draws other tokens."""
  logits = jax.random.normal(jax.random.key(1), (64, 300)).at[:, 7].set(-jnp.inf)
  keys = jax.random.split(jax.random.key(9), 64)
  choose = jax.jit(sampling.choose, static_argnums=2)
  for params in (sampling.SamplingParams(), sampling.SamplingParams(top_p=0.5)):
    tokens = np.asarray(choose(logits, keys, params).tokens)
    assert (tokens != 7).all()
    reversed_ = np.asarray(choose(logits[::-1], keys[::-1], params).tokens)[::-1]
    np.testing.assert_array_equal(reversed_, tokens)
    assert int(choose(logits[5:6], keys[5:6], params).tokens[0]) == tokens[5]
    other = np.asarray(choose(logits, jax.random.split(jax.random.key(10), 64), params).tokens)
    assert (other != tokens).mean() > 0.5
  ties = jnp.asarray([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
  np.testing.assert_array_equal(np.asarray(sampling.first_argmax(ties)), [1, 0])


@pytest.mark.parametrize("p", [0.99, 0.9, 0.3])
def test_top_p_draw_stays_in_the_kept_set(p):
  """Every token `top_p_draw` keeps lies in `top_p_mask`'s kept set, also with ties at the top of
  a row's order and where top-k left −inf entries. At p = 0.3 over near-uniform rows most rows'
  first draws fall outside it and redraw."""
  draw = jax.jit(sampling.top_p_draw, static_argnums=(1, 2))
  first_outside = []
  for seed, scale in enumerate((0.3, 2.0, 6.0)):
    logits = scale * jax.random.normal(jax.random.key(seed), (48, 997))
    logits = logits.at[:, :5].set(logits[:, 5:6])
    logits = logits.at[::3].set(sampling.top_k_mask(logits[::3], 50))
    keys = jax.random.split(jax.random.key(100 + seed), 48)
    uniform = sampling.row_uniforms(keys)
    kept = np.isfinite(np.asarray(sampling.top_p_mask(logits, p)))
    tokens = np.asarray(draw(logits, uniform, p))
    assert kept[np.arange(48), tokens].all()
    first = np.asarray(sampling.inverse_cdf(jax.nn.softmax(logits, axis=-1), uniform(0)))
    first_outside.append(1 - kept[np.arange(48), first].mean())
  if p == 0.3:
    assert first_outside[0] > 0.5  # rows redrew, some more than once


def test_top_p_frequencies_after_many_rounds():
  """Rows that mostly redraw (near-uniform, p = 0.4) still draw the kept set's own distribution."""
  vocab, n = 23, 40_000
  logits = 0.4 * np.random.default_rng(2).normal(size=vocab).astype(np.float32)
  logits[3] = logits[4]  # a tie
  kept = np.isfinite(np.asarray(sampling.top_p_mask(jnp.asarray(logits)[None], 0.4)))[0]
  probs = np.exp(logits) * kept
  assert 3 <= kept.sum() <= vocab - 5
  params = sampling.SamplingParams(top_p=0.4)
  choice = jax.jit(sampling.choose, static_argnums=2)(
      jnp.broadcast_to(jnp.asarray(logits), (n, vocab)), jax.random.split(jax.random.key(5), n),
      params)
  _assert_frequencies(np.asarray(choice.tokens), probs / probs.sum(), vocab)


def _forced_model(target_logits: np.ndarray) -> Qwen25VL:
  """A tiny model whose next-token logits are `target_logits` whatever the context.

  Zero attention/MLP outputs leave the residual stream at the embedding; every embedding row is
  all-ones, so the final norm gives ones·(1 + 1e-6)^-½ and the untied head column v gives
  target_v·(1 − 5e-7) — far below the statistical resolution of the test.
  """
  cfg = tiny_config(tie=False)
  model = init_model(cfg)
  layers = model.text.layers
  layers.attn.o[...] = jnp.zeros_like(layers.attn.o[...])
  layers.mlp.down[...] = jnp.zeros_like(layers.mlp.down[...])
  model.text.embedding[...] = jnp.ones_like(model.text.embedding[...])
  d = cfg.text.hidden_size
  model.lm_head[...] = jnp.broadcast_to(jnp.asarray(target_logits / d, jnp.float32),
                                        (d, cfg.text.vocab_size))
  return model


def test_sampler_frequencies_on_forced_logits():
  """The whole loop (temperature → top-k → top-p) against exact expected frequencies."""
  vocab = tiny_config().text.vocab_size
  target = np.full(vocab, -30.0)  # ≈ e-30 each: never drawn in 16K samples
  tokens = np.array([11, 22, 33, 44, 55, 66])
  target[tokens] = np.log(PROBS)
  params = sampling.SamplingParams(temperature=0.7, top_k=4, top_p=0.8)
  forced = make_sampler(_forced_model(target), sampling=params, num_samples=512,
                        prompt_buckets=(8,), new_token_buckets=(32,))
  ids, mask = _prompts(lengths=[5], total=5)
  out = _np(forced(ids, mask, jax.random.key(3), max_new_tokens=32))
  assert out.mask.all()
  # τ = 0.7: q ∝ p^(1/0.7) = (.432, .267, .128, .094, .052, .027); top-4 renormalised: masses
  # before each kept token 0, .469, .759, .898 → top-p 0.8 keeps the first three.
  q = _tempered(0.7)
  expected = q[:3] / q[:3].sum()
  remapped = np.searchsorted(tokens, out.tokens)  # token id → its index in `tokens` (or beyond)
  assert np.isin(out.tokens, tokens).all()
  _assert_frequencies(remapped, np.concatenate([expected, np.zeros(3)]), len(tokens))


# ---------------------------------------------------------------------------------------------
# G samples from one prefill; determinism.


def test_g_samples_share_one_prefill_and_follow_the_key(sampler):
  ids, mask = _prompts()
  state = sampler.prefill(ids, mask, max_new_tokens=20)
  g = sampler.config.num_samples
  cache, layers = state.cache, sampler.model.cfg.text.num_layers
  # One buffer per layer, handed to the decode loop as it reads them.
  assert len(cache.k) == len(cache.v) == len(cache.prefix.k) == len(cache.prefix.v) == layers
  # The prompt's keys/values are held once; its G samples (adjacent rows) continue them in their
  # own 24 slots (the new-token bucket), empty so far.
  assert cache.prefix.k[0].shape[0] == cache.prefix.valid.shape[0] == ids.shape[0]
  assert cache.k[0].shape[0] == state.logits.shape[0] == ids.shape[0] * g
  assert cache.rows_per_prefix == g and cache.length == 24 and int(cache.index) == 0
  np.testing.assert_array_equal(cache.prefix.valid, state.prompt_mask[::g])
  logits = np.asarray(state.logits).reshape(ids.shape[0], g, -1)
  assert (logits == logits[:, :1]).all()  # one prefill's logits, repeated: bit-identical

  first = _np(sampler(ids, mask, jax.random.key(10), max_new_tokens=20))
  again = _np(sampler(ids, mask, jax.random.key(10), max_new_tokens=20))
  other = _np(sampler(ids, mask, jax.random.key(11), max_new_tokens=20))
  np.testing.assert_array_equal(first.tokens, again.tokens)
  np.testing.assert_array_equal(first.log_probs, again.log_probs)
  assert (first.tokens != other.tokens).any(axis=1).all()
  groups = first.tokens.reshape(ids.shape[0], g, -1)
  for b in range(ids.shape[0]):
    assert len({row.tobytes() for row in groups[b]}) == g, f"prompt {b}: identical samples"
  np.testing.assert_array_equal(first.prompt_tokens[::g][:, -13:], ids)


# ---------------------------------------------------------------------------------------------
# Sharding and compilation.


def test_sharded_sampling_equals_single_device(model, sampler, mesh8):
  sharded = Sampler(model, sampler.config, mesh=mesh8)
  ids, mask = _prompts()
  want = _np(sampler(ids, mask, jax.random.key(4), max_new_tokens=24))
  out = sharded(ids, mask, jax.random.key(4), max_new_tokens=24)
  assert len(out.tokens.sharding.device_set) == 8
  assert out.tokens.sharding.spec[0] == ("data", "fsdp")
  got = _np(out)
  # Random bits do not depend on sharding; logits differ by summation order only (~1e-6).
  _assert_same_samples(got, want)
  with pytest.raises(ValueError, match="rollout layout's 4 data-parallel groups"):
    sharded(ids[:3], mask[:3], jax.random.key(4), max_new_tokens=24)


@pytest.mark.parametrize("tensor", [0, 4])
def test_the_rollout_layout_samples_as_one_device_and_gathers_no_weight_in_the_loop(
    model, sampler, tensor):
  """From the training layout (every weight split over fsdp = 4), a call decodes on a compute-dtype
  copy split over `tensor` devices (0: the K/V heads' 2): the same tokens as one device, and the
  decode loop's body (read from its compiled HLO) holds no all-gather."""
  sharded = Sampler(model, dataclasses.replace(sampler.config, tensor_parallel=tensor),
                    mesh=make_mesh(fsdp=4))
  tp = tensor or 2
  assert dict(sharded.layout.shape) == {"data": 4 // tp, "fsdp": 1, "tensor": tp}
  ids, mask = _prompts()
  want = _np(sampler(ids, mask, jax.random.key(4), max_new_tokens=24))
  got = _np(sharded(ids, mask, jax.random.key(4), max_new_tokens=24))
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.log_probs, want.log_probs, atol=2e-5)

  params = sharded.layout_params()
  q = params["text"]["layers"][0]["attn"]["q"][...]
  d, n, h = q.shape  # split over tensor only: each device holds N / tensor query heads
  assert q.dtype == jnp.dtype(model.dtype)
  assert q.sharding.shard_shape(q.shape) == (d, n // tp if n % tp == 0 else n, h)
  state = sharded.prefill(ids, mask, max_new_tokens=24, params=params)
  scalar = jax.sharding.NamedSharding(sharded.layout, jax.sharding.PartitionSpec())
  with sharding.on_mesh(sharded.layout):
    text = sharded.decode_loop.lower(params, state.cache, dataclasses.replace(state, cache=None),
                                     jax.device_put(jax.random.key(0), scalar),
                                     jax.device_put(jnp.int32(24), scalar)).compile().as_text()
  decode = [l for l in hlo.loop_collectives(text) if l.loop == "jit(_decode_impl)/while"]
  assert decode and all("all-gather" not in l.counts for l in decode), [l.summary() for l in decode]


def test_no_recompilation_within_a_bucket(model, sampler):
  sampler(*_prompts(), jax.random.key(0), max_new_tokens=24)
  before = dict(sampler.traces.counts)
  ids, mask = _prompts(lengths=[9, 3, 9, 6], total=9, seed=4)
  first = _np(sampler(ids, mask, jax.random.key(1), max_new_tokens=5))
  sampler(*_prompts(), jax.random.key(2), max_new_tokens=24)
  # New parameters (a trainer's update, in place) are read without recompiling.
  scale = model.text.final_norm.scale[...]
  model.text.final_norm.scale[...] = scale * 1.5
  try:
    updated = _np(sampler(ids, mask, jax.random.key(1), max_new_tokens=5))
  finally:
    model.text.final_norm.scale[...] = scale
  assert dict(sampler.traces.counts) == before
  assert first.lengths.max() == 5
  assert not np.array_equal(first.log_probs, updated.log_probs)
  # A longer prompt lands in the next bucket: exactly one more compilation of each stage.
  sampler(*_prompts(lengths=[20, 3, 9, 6], total=20), jax.random.key(0), max_new_tokens=24)
  assert dict(sampler.traces.counts) == {k: v + 1 for k, v in before.items()}


def test_bad_inputs_are_named(sampler):
  ids, mask = _prompts()
  with pytest.raises(ValueError, match="not left-padded"):
    sampler(ids[:, ::-1], mask[:, ::-1], jax.random.key(0), max_new_tokens=8)
  with pytest.raises(ValueError, match="max_new_tokens=49 exceeds"):
    sampler(ids, mask, jax.random.key(0), max_new_tokens=49)
  with pytest.raises(ValueError, match="prompt length=70 exceeds"):
    sampler(*_prompts(total=70), jax.random.key(0), max_new_tokens=8)
  with pytest.raises(ValueError, match="given together"):
    sampler(ids, mask, jax.random.key(0), max_new_tokens=8, image_grid_thw=((1, 2, 2),))
  with pytest.raises(ValueError, match=r"max_new_tokens=30 must be in \[1, 24\]"):
    sampler.decode(sampler.prefill(ids, mask, max_new_tokens=8), jax.random.key(0), 30)
  with pytest.raises(ValueError, match="top_p"):
    sampling.SamplingParams(top_p=0.0)
  with pytest.raises(ValueError, match="strictly increasing"):
    dataclasses.replace(sampler.config, new_token_buckets=(64, 32))


def test_chunked_rollout_gives_the_whole_call_greedily(model, tokenizer):
  """Chunks of prompts, one KV cache alive at a time, decode the same greedy completions in the
  same row order, with images and on a mesh."""
  greedy = dict(sampling=sampling.SamplingParams(temperature=0.0), num_samples=2, **BUCKETS)
  rng = np.random.default_rng(9)
  prompts = build_image_prompts(tokenizer, [
      (text, rng.integers(0, 256, size=(56, 56, 3), dtype=np.uint8))
      for text in ("Where is the cup?", "Push the button.", "Open the drawer, slowly.",
                   "Reach the red target.")])
  call = lambda s: _np(s(prompts.ids, prompts.mask, jax.random.key(2), max_new_tokens=24,
                         pixel_values=np.concatenate(list(prompts.pixels)),
                         image_grid_thw=prompts.grids))
  want = call(make_sampler(model, **greedy))
  for mesh in (None, make_mesh(fsdp=2)):
    got = call(make_sampler(model, mesh=mesh, chunk_prompts=2, **greedy))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.prompt_tokens, want.prompt_tokens)
    np.testing.assert_allclose(got.log_probs, want.log_probs, atol=2e-5)
  with pytest.raises(ValueError, match="chunk_prompts=3"):
    call(make_sampler(model, chunk_prompts=3, **greedy))


def test_a_prompt_samples_the_same_whatever_shares_its_call(model, sampler):
  """Per-row keys: chunks sample what the whole call samples, and a prompt given its index samples
  the same completions in another call, beside other prompts or alone."""
  ids, mask = _prompts()
  g = sampler.config.num_samples
  want = _np(sampler(ids, mask, jax.random.key(4), max_new_tokens=24))
  chunked = Sampler(model, dataclasses.replace(sampler.config, chunk_prompts=2))
  got = _np(chunked(ids, mask, jax.random.key(4), max_new_tokens=24))
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.log_probs, want.log_probs, atol=2e-5)
  # Prompts 3 and 1, in that order, with two copies of prompt 0 under other indices.
  order = [3, 0, 1, 0]
  again = _np(sampler(ids[order], mask[order], jax.random.key(4), max_new_tokens=24,
                      prompt_index=[3, 7, 1, 8]))
  for row, prompt in ((0, 3), (2, 1)):
    np.testing.assert_array_equal(again.tokens[row * g:(row + 1) * g],
                                  want.tokens[prompt * g:(prompt + 1) * g])
  assert (again.tokens[g:2 * g] != want.tokens[:g]).any()  # index 7 is not prompt 0's index 0
  with pytest.raises(ValueError, match="prompt_index must be 4 integers"):
    sampler(ids, mask, jax.random.key(4), max_new_tokens=24, prompt_index=[0, 1])


class _WholePromptsStop(Sampler):
  """Every sample of an even-indexed prompt stops at token 3 (the stop token forced), no other row
  ever stops (the stop token suppressed): finished rows are whole prompts."""

  def _record(self, loop, logits, inputs):
    stop = jnp.arange(logits.shape[-1]) == EOS
    force = ((inputs.prompt_index % 2 == 0) & (loop.step == 2))[:, None]
    logits = jnp.where(force, jnp.where(stop, 0.0, -1e9), jnp.where(stop, -1e9, logits))
    return super()._record(loop, logits, inputs)


@pytest.mark.parametrize("mesh", [None, "fsdp=4"])
def test_compaction_of_whole_prompts_keeps_their_cache_shared(model, mesh):
  """When whole prompts finish, the kept rows continue their prompts' shared cache (fewer prompt
  rows, no per-row copies) and decode what one loop decodes, on one device and on the rollout
  mesh (2 data-parallel groups)."""
  mesh = None if mesh is None else make_mesh(fsdp=4)
  config = SamplerConfig(num_samples=4, stop_tokens=(EOS,), pad_id=PAD, **BUCKETS)
  ids, mask = _prompts()
  want = _np(_WholePromptsStop(model, config, mesh=mesh)(ids, mask, jax.random.key(8),
                                                          max_new_tokens=20))
  np.testing.assert_array_equal(want.lengths, np.repeat([3, 20, 3, 20], 4))
  compacting = _WholePromptsStop(model, dataclasses.replace(config, compact_every=4), mesh=mesh)
  kept, gather = [], compacting.gather_step

  def recorded(*args):
    out = gather(*args)
    kept.append(out[0].cache)
    return out

  compacting.gather_step = recorded
  got = _np(compacting(ids, mask, jax.random.key(8), max_new_tokens=20))
  _assert_same_samples(got, want)
  # 16 rows → 8: the two live prompts' rows, reading two prompt rows.
  assert [(c.k[0].shape[0], c.prefix.k[0].shape[0]) for c in kept] == [(8, 2)]


@pytest.mark.parametrize("mesh", [None, "fsdp=4"])
def test_compaction_decodes_what_one_loop_decodes(model, mesh):
  """A wide spread of lengths (58 stop tokens of 1031: a row stops with p ≈ 5.6% per token):
  decoding in segments of 4 tokens, the finished rows dropped into smaller row buckets, gives one
  loop's tokens and log-probs, on one device and on the rollout mesh (2 data-parallel groups)."""
  mesh = None if mesh is None else make_mesh(fsdp=4)
  config = dict(sampling=sampling.SamplingParams(), num_samples=4, stop_tokens=tuple(range(2, 60)),
                **BUCKETS)
  ids, mask = _prompts()
  want = _np(make_sampler(model, mesh=mesh, **config)(ids, mask, jax.random.key(5),
                                                      max_new_tokens=48))
  assert want.lengths.min() <= 6 and want.lengths.max() >= 30, want.lengths
  compacting = make_sampler(model, mesh=mesh, compact_every=4, **config)
  got = _np(compacting(ids, mask, jax.random.key(5), max_new_tokens=48))
  _assert_same_samples(got, want)
  np.testing.assert_array_equal(got.finish_reasons, want.finish_reasons)
  assert compacting.traces.counts["gather"] >= 2  # 16 rows → 8 → 4 (or fewer steps)
  # Again: every bucket's programs are compiled; nothing more is.
  before = dict(compacting.traces.counts)
  compacting(ids, mask, jax.random.key(5), max_new_tokens=48)
  assert dict(compacting.traces.counts) == before


@pytest.mark.parametrize("mesh", [None, "fsdp=4"])
def test_a_packed_prefill_samples_what_a_padded_one_does(model, mesh):
  """Prompts of 4–60 tokens in a 128-slot bucket: the prefill packs their real tokens (per data
  group on the rollout mesh) and samples the padded prefill's tokens and log-probs."""
  mesh = None if mesh is None else make_mesh(fsdp=4)
  lengths = (60, 4, 33, 9, 51, 17, 26, 40)
  ids, mask = _prompts(lengths, 128, seed=3)
  config = dict(sampling=sampling.SamplingParams(top_p=0.9), num_samples=2,
                prompt_buckets=(128,), new_token_buckets=(24,))
  padded = make_sampler(model, mesh=mesh, pack_prompts=False, **config)
  packed = make_sampler(model, mesh=mesh, **config)
  shards = packed._shards()
  assert packing.rows_for(mask, shards) is not None
  want = _np(padded(ids, mask, jax.random.key(8), max_new_tokens=24))
  got = _np(packed(ids, mask, jax.random.key(8), max_new_tokens=24))
  _assert_same_samples(got, want)
