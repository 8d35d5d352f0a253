"""Choosing the next token from logits: temperature, top-k, top-p (nucleus) and greedy.

Small pure functions on [B, V] logits. `choose` applies them in Hugging Face's warper order
(temperature → top-k → top-p) and draws one token per row.

Log-probabilities: `choose` returns log softmax(logits / τ) of the chosen token over the *whole*
vocabulary, in f32 — the tempered policy, before top-k/top-p truncation (τ = 1 for greedy). At τ = 1
(the paper's rollouts) this equals a fresh forward pass's log_softmax, which is what the trainer
needs for its old log-probs; at τ ≠ 1 the trainer must divide its logits by the same τ, as
verl/EasyR1 do. Truncation is a property of the sampler, not of the policy being optimised, so it is
left out (with the paper's top-p 0.99 it would move a log-prob by at most −log 0.99 ≈ 0.01).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How the next token is drawn. Static under jit: each distinct value compiles its own loop.

  temperature: divides the logits; 0 means greedy (argmax).
  top_p: keep the smallest set of most likely tokens whose mass reaches top_p (1 = off).
  top_k: keep the k most likely tokens (0 = off).
  """

  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 means off)")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Choice:
  tokens: jax.Array  # [B] int32
  log_probs: jax.Array  # [B] f32: log softmax(logits / τ) of `tokens` (see the module docstring)


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
  """[B, V] logits with all but the k largest of each row set to −inf (ties with the k-th kept)."""
  kth = jax.lax.top_k(logits, min(k, logits.shape[-1]))[0][..., -1:]
  return jnp.where(logits >= kth, logits, -jnp.inf)


def _ordered_bits(x: jax.Array) -> jax.Array:
  """f32 → int32 keys in the same order (IEEE-754 sign-magnitude → two's complement)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _mass_above(keys: jax.Array, probs: jax.Array, key: jax.Array) -> jax.Array:
  """[B, 1] probability mass of the tokens whose key is strictly above `key` [B, 1]: top-p keeps a
  token exactly when this mass at its own key is below p."""
  return jnp.sum(jnp.where(keys > key, probs, 0.0), axis=-1, keepdims=True)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
  """[B, V] logits keeping, per row, the most likely tokens until their mass first reaches p.

  A token is kept when the mass of the strictly more likely tokens is below p, as Hugging Face's
  TopPLogitsWarper does (so the top token is always kept; ties are kept together). −inf entries
  (from top-k) carry no mass.

  Instead of sorting the vocabulary (≈0.45 s per step for 40 × 32K logits on a CPU), the smallest
  kept logit is found by bisection over the logits' order-preserving int32 keys: the predicate
  "mass strictly above key k < p" is monotone in k, and 32 halvings of the 2^32 keys reach the
  exact threshold, each costing one masked sum over [B, V].
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  keys = _ordered_bits(logits)

  def halve(_, bounds):
    # Invariant: the predicate is false at lo and true at hi.
    lo, hi = bounds
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without int32 overflow
    above = _mass_above(keys, probs, mid)
    return jnp.where(above < p, lo, mid), jnp.where(above < p, mid, hi)

  # lo: below every token (all mass above it, ≥ p); hi: the top token (no mass above it).
  lo = keys.min(axis=-1, keepdims=True) - 1
  hi = keys.max(axis=-1, keepdims=True)
  _, threshold = jax.lax.fori_loop(0, 32, halve, (lo, hi))
  return jnp.where(keys >= threshold, logits, -jnp.inf)


# Inverse-CDF draws find a row's token block by block: one pass over [B, V] for the blocks'
# sums, then one block per row.
_DRAW_BLOCK = 128


def _block(v: int, parts: int) -> int:
  """The draw's block size for a vocabulary of `v` split into `parts` shards: 128 on one; on
  several, the largest power of two up to 128 that divides a shard (Qwen's 151936 = 2⁷ · 1187
  over 2 shards: 64), so that no block straddles two shards; 128 where that power is below 8
  (blocks so small would make the blocks' cumulative sum nearly a whole row's)."""
  shard = v // parts
  if parts == 1 or v % parts or shard & -shard < 8:
    return _DRAW_BLOCK
  return min(_DRAW_BLOCK, shard & -shard)


def inverse_cdf(weights: jax.Array, u: jax.Array, parts: int = 1) -> jax.Array:
  """[B, V] non-negative weights and u [B] in [0, 1) → [B] int32: each row's token i with
  cumsum(w)[i − 1] ≤ u · Σw < cumsum(w)[i], in vocabulary order (a draw from w / Σw). Never a
  token of weight 0, whatever the rounding. An f32 uniform's 2⁻²³ steps put each token's chance
  on that grid (a token below 1.2e-7 is drawn at 0 or 2⁻²³); a run of tokens keeps its mass.

  Found in two levels, not by a [B, V] cumulative sum: the blocks' sums and their cumulative sum
  pick the block, then the block's own cumulative sum the token. `parts`: the shards a mesh axis
  splits V into; blocks then lie within one (`_block`), so the sums are taken where the logits
  lie and only [B, V / block] of them cross devices: blocks that straddled two shards made XLA
  gather every row's whole f32 vocabulary onto each device in every decode step.
  """
  b, v = weights.shape
  size = _block(v, parts)
  n = -(-v // size)
  blocks = jnp.pad(weights, [(0, 0), (0, n * size - v)]).reshape(b, n, size)
  sums = blocks.sum(axis=-1)
  ends = jnp.cumsum(sums, axis=-1)
  target = u * ends[:, -1]
  block = _first_above(ends, sums, target)
  start = jnp.take_along_axis(ends - sums, block[:, None], axis=-1)[:, 0]
  within = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]
  return block * size + _first_above(jnp.cumsum(within, axis=-1), within, target - start)


def _first_above(ends: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
  """[B] index of each row's first positive-weight entry whose running sum `ends` [B, N] exceeds
  `target` [B]; where rounding leaves none, the row's last positive-weight entry."""
  index = jnp.arange(ends.shape[-1], dtype=jnp.int32)
  positive = weights > 0
  first = jnp.min(jnp.where(positive & (ends > target[:, None]), index, ends.shape[-1]), axis=-1)
  last = jnp.max(jnp.where(positive, index, -1), axis=-1)
  return jnp.where(first == ends.shape[-1], last, first)


def row_uniforms(keys: jax.Array) -> Callable[[int | jax.Array], jax.Array]:
  """round ↦ [B] uniforms in [0, 1), row b's from fold_in(keys[b], round): a draw's r-th round."""
  return lambda round_: jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, round_)))(keys)


def top_p_draw(logits: jax.Array, uniform: Callable[[int | jax.Array], jax.Array], p: float,
               parts: int = 1) -> jax.Array:
  """[B] tokens drawn from each row's top-p set K (`top_p_mask(logits, p)`'s kept tokens), in
  proportion to their probabilities, without finding K: rejection sampling (as FlashInfer's
  top-p sampling does).

  A row draws from its whole distribution (`inverse_cdf` with `uniform(0)`, [B] in [0, 1), as
  `row_uniforms` gives) and keeps the token when it lies in K (the mass strictly above it < p: one
  masked sum). A token outside K shows that no token as likely as it or less is in K, so the row
  draws again (`uniform(1)`, `uniform(2)`, …) among the tokens strictly more likely than it: a set
  that still holds K. Whatever set a round draws from, a draw that lands in K is K's
  distribution, so the kept token is too. A row keeps its first draw with probability ≥ p; at
  p = 0.99 over 40 rows a third of the steps take one more round (a few passes over [B, V]).
  """
  # Each piece computes the logits' keys and probabilities afresh (XLA merges the copies within
  # one): a [B, V] value the branch shared with the first draw would be written out for the
  # branch in every step, 0.5 ms of a 3 ms draw over 40 × 32K logits on a 2-core CPU.
  keys_probs = lambda: (_ordered_bits(logits),
                        jax.nn.softmax(logits.astype(jnp.float32), axis=-1))

  def judged(tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens, their keys [B, 1], whether each lies outside K)."""
    keys, probs = keys_probs()
    drawn = jnp.take_along_axis(keys, tokens[:, None], axis=-1)
    return tokens, drawn, _mass_above(keys, probs, drawn)[:, 0] >= p

  def redraw(state):
    tokens, floor, outside, round_ = state
    keys, probs = keys_probs()
    new_tokens, new_floor, still_outside = judged(
        inverse_cdf(jnp.where(keys > floor, probs, 0.0), uniform(round_), parts))
    return (jnp.where(outside, new_tokens, tokens), jnp.where(outside[:, None], new_floor, floor),
            outside & still_outside, round_ + 1)

  first = judged(inverse_cdf(keys_probs()[1], uniform(0), parts))
  return jax.lax.cond(
      jnp.any(first[2]),
      lambda: jax.lax.while_loop(lambda state: jnp.any(state[2]), redraw, (*first, 1))[0],
      lambda: first[0])


def first_argmax(x: jax.Array) -> jax.Array:
  """[B, V] → [B] int32 index of each row's first maximum, as jnp.argmax.

  Written as a max and a min over indices: XLA:CPU runs jnp.argmax's (value, index) reduction
  about 5× slower than these two plain reductions (6 ms vs 1.2 ms for 40 × 32K).
  """
  top = x.max(axis=-1, keepdims=True)
  index = jnp.arange(x.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1)


def choose(logits: jax.Array, keys: jax.Array, params: SamplingParams, parts: int = 1) -> Choice:
  """One token per row of [B, V] logits, with its f32 log-probability.

  A row draws by inverse CDF with uniforms from its own key (`keys`, [B]; round r of a top-p
  draw folds in r): its draw depends only on its key and its logits, never on the other rows of
  the batch, its size or its sharding, so rows can be regrouped (chunks, compaction) without
  changing a token. One uniform per row and round, not a Gumbel-max draw's [B, V] noise: on a
  2-core CPU a top-p 0.99 draw over 40 × 32K logits takes 3.7–3.9 ms where Gumbel-max took 19–20
  ms, most of it generating the noise (less inside a decode step, where the noise overlapped the
  layers).
  """
  # f32 whatever the compute dtype: a bf16 log-softmax over a 150K vocabulary loses ~2 digits.
  logits = logits.astype(jnp.float32)
  if params.greedy:
    tokens = first_argmax(logits)
  else:
    logits = logits / params.temperature
    truncated = logits
    if params.top_k:
      truncated = top_k_mask(truncated, params.top_k)
    uniform = row_uniforms(keys)
    tokens = (top_p_draw(truncated, uniform, params.top_p, parts) if params.top_p < 1
              else inverse_cdf(jax.nn.softmax(truncated, axis=-1), uniform(0), parts))
  picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
  return Choice(tokens=tokens, log_probs=picked - jax.nn.logsumexp(logits, axis=-1))


def row_keys(key: jax.Array, prompt_index: jax.Array, num_samples: int) -> jax.Array:
  """[B·G] keys of rows b·G + g: fold_in(fold_in(key, prompt_index[b·G + g]), g). A row's key
  names the prompt (its index in the caller's batch) and the sample, not the row's position."""
  sample = jnp.arange(prompt_index.shape[0], dtype=jnp.int32) % num_samples
  return jax.vmap(lambda p, g: jax.random.fold_in(jax.random.fold_in(key, p), g))(
      prompt_index, sample)
