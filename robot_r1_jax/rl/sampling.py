"""Choosing the next token from logits: temperature, top-k, top-p (nucleus) and greedy.

Small pure functions on [B, V] logits. `choose` applies them in Hugging Face's warper order
(temperature → top-k → top-p) and draws one token per row.

Log-probabilities: `choose` returns log softmax(logits / τ) of the chosen token over the *whole*
vocabulary, in f32 — the tempered policy, before top-k/top-p truncation (τ = 1 for greedy). At τ = 1
(the paper's rollouts) this equals a fresh forward pass's log_softmax, which is what the trainer
needs for its old log-probs; at τ ≠ 1 the trainer must divide its logits by the same τ, as
verl/EasyR1 do. Truncation is a property of the sampler, not of the policy being optimised, so it is
left out (with the paper's top-p 0.99 it moves the log-probs by less than 0.01).
"""

from __future__ import annotations

import dataclasses

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


@dataclasses.dataclass(frozen=True)
class Choice:
  tokens: jax.Array  # [B] int32
  log_probs: jax.Array  # [B] f32: log softmax(logits / τ) of `tokens` (see the module docstring)


jax.tree_util.register_dataclass(Choice, data_fields=["tokens", "log_probs"], meta_fields=[])


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
  """[B, V] logits with all but the k largest of each row set to −inf (ties with the k-th kept)."""
  kth = jax.lax.top_k(logits, min(k, logits.shape[-1]))[0][..., -1:]
  return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
  """[B, V] logits keeping, per row, the most likely tokens until their mass first reaches p.

  A token is kept when the mass of the strictly more likely tokens is below p (so the top token is
  always kept), as Hugging Face's TopPLogitsWarper. −inf entries (from top-k) carry no mass.
  """
  ordered = -jnp.sort(-logits, axis=-1)  # descending
  probs = jax.nn.softmax(ordered, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  num_kept = jnp.sum(mass_before < p, axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(ordered, num_kept - 1, axis=-1)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def choose(logits: jax.Array, key: jax.Array, params: SamplingParams) -> Choice:
  """One token per row of [B, V] logits, with its f32 log-probability.

  Rows draw independently from one key (jax.random.categorical splits it over the batch), so the
  result depends only on the key and the logits, never on how the batch is sharded.
  """
  # f32 whatever the compute dtype: a bf16 log-softmax over a 150K vocabulary loses ~2 digits.
  logits = logits.astype(jnp.float32)
  if params.greedy:
    tokens = jnp.argmax(logits, axis=-1)
  else:
    logits = logits / params.temperature
    truncated = logits
    if params.top_k:
      truncated = top_k_mask(truncated, params.top_k)
    if params.top_p < 1:
      truncated = top_p_mask(truncated, params.top_p)
    tokens = jax.random.categorical(key, truncated, axis=-1)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]
  return Choice(tokens=tokens.astype(jnp.int32), log_probs=picked)
