"""Advantage estimators: GRPO, Dr. GRPO, RLOO, REINFORCE++ and REINFORCE++ with a group baseline.

Every estimator has one signature and is selected by name through `ESTIMATORS` (a user's module
adds one with `register_estimator`):

    advantages = ESTIMATORS[name](scores, response_mask, group_size, kl_penalty, options=options)

  scores         [B·G] f32   one outcome reward per completion; the G completions of a prompt are
                             contiguous rows (g·G … g·G + G − 1).
  response_mask  [B·G, R]    1 on response tokens that are trained, 0 on padding.
  group_size     int         G; static under `jax.jit` (`static_argnums=2`).
  kl_penalty     [B·G, R]    optional β·KL per token (`kl.KLPenalty` placed in the reward: β times
                             any estimator of `kl.KL_ESTIMATORS`, k1 in the REINFORCE++ recipe).
                             When given it is taken *from the reward*: per token for REINFORCE++,
                             summed over the response for the outcome estimators.
  returns        [B·G, R] f32 token advantages, exactly 0 on padding.

Formulas follow DESIGN.md (EasyR1/verl as the paper ran them), with one deliberate difference:
degenerate groups (all rewards equal, or G = 1) and empty batches give zero advantages where
EasyR1 asserts G > 1 or divides by zero. Means are taken after subtracting a sample of the data,
so a constant group gives *exactly* zero (a plain f32 mean of equal values is off by an ulp, which
GRPO's std division by ~ulp + 1e-6 would blow up into advantages of order 0.1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Protocol

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AdvantageOptions:
  """Constants of the estimators (hashable, so it can be a static jit argument)."""

  std_eps: float = 1e-6  # GRPO: A = (r − mean) / (std + std_eps).
  whiten_eps: float = 1e-8  # REINFORCE++: A = (x − mean) / sqrt(var + whiten_eps).

  def __post_init__(self):
    for name in ("std_eps", "whiten_eps"):
      value = getattr(self, name)
      if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"AdvantageOptions.{name}={value} must be finite and >= 0")


class AdvantageEstimator(Protocol):

  def __call__(self, scores: jax.Array, response_mask: jax.Array, group_size: int,
               kl_penalty: jax.Array | None = None, *,
               options: AdvantageOptions = AdvantageOptions()) -> jax.Array:
    ...


ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
  """Decorator: adds `fn(scores, response_mask, group_size, kl_penalty=None, *, options)` ->
  [B·G, R] advantages as the estimator `name` (`LearnerConfig.algo`, `--algo`)."""

  def add(fn: AdvantageEstimator) -> AdvantageEstimator:
    if name in ESTIMATORS:
      raise ValueError(f"an advantage estimator named {name!r} is already registered")
    ESTIMATORS[name] = fn
    return fn

  return add


def get_estimator(name: str) -> AdvantageEstimator:
  """`ESTIMATORS[name]` with an error that lists the valid names."""
  if name not in ESTIMATORS:
    raise ValueError(f"unknown advantage estimator {name!r}; choose one of {sorted(ESTIMATORS)}")
  return ESTIMATORS[name]


def _validate(scores: jax.Array, response_mask: jax.Array, group_size: int,
              kl_penalty: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Shape checks (static: they run once, at trace time); f32 scores, a bool mask, f32 penalty."""
  scores, response_mask = jnp.asarray(scores), jnp.asarray(response_mask)
  penalty = None if kl_penalty is None else jnp.asarray(kl_penalty)
  if not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f"group_size={group_size!r} must be a positive int (static under jit)")
  if scores.ndim != 1:
    raise ValueError(f"scores must be [B·G], got shape {scores.shape}")
  if response_mask.ndim != 2 or response_mask.shape[0] != scores.shape[0]:
    raise ValueError(f"response_mask must be [B·G, R] with B·G={scores.shape[0]} rows, got shape "
                     f"{response_mask.shape}")
  if scores.shape[0] % group_size:
    raise ValueError(f"scores has {scores.shape[0]} rows, not a multiple of group_size="
                     f"{group_size}")
  if penalty is not None and penalty.shape != response_mask.shape:
    raise ValueError(f"kl_penalty must have the response_mask shape {response_mask.shape}, got "
                     f"{penalty.shape}")
  mask = response_mask.astype(bool)
  # `where`, not a product: padding may hold anything (inf/nan from a padded forward pass).
  penalty = None if penalty is None else jnp.where(mask, penalty.astype(jnp.float32), 0.0)
  return scores.astype(jnp.float32), mask, penalty


def _outcome_scores(scores: jax.Array, penalty: jax.Array | None) -> jax.Array:
  """[B·G] sequence scores: the reward minus Σ_t β·KL when the KL goes into the reward."""
  return scores if penalty is None else scores - penalty.sum(axis=-1)


def _group_deviation(scores: jax.Array, group_size: int) -> jax.Array:
  """[B, G] r − mean over each group; exactly 0 for a constant group (see the module docstring)."""
  groups = scores.reshape(-1, group_size)
  shifted = groups - groups[:, :1]
  return shifted - shifted.mean(axis=1, keepdims=True)


def _per_token(advantages: jax.Array, mask: jax.Array) -> jax.Array:
  """[B·G] sequence advantages → [B·G, R] on every response token."""
  return jnp.where(mask, advantages.reshape(-1)[:, None], 0.0)


def _whiten(values: jax.Array, mask: jax.Array, eps: float) -> jax.Array:
  """(x − mean) / sqrt(var + eps) over the valid tokens of the whole batch, unbiased var; 0 on pad.

  The shift by one valid value keeps constant inputs exactly zero (see the module docstring).
  """
  count = mask.sum()
  first_valid = values.reshape(-1)[jnp.argmax(mask.reshape(-1))]
  shifted = jnp.where(mask, values - first_valid, 0.0)
  centred = jnp.where(mask, shifted - shifted.sum() / jnp.maximum(count, 1), 0.0)
  # Bessel's correction as EasyR1/verl; a single valid token has zero deviation, so n−1 → 1 is safe.
  var = jnp.square(centred).sum() / jnp.maximum(count - 1, 1)
  return centred * jax.lax.rsqrt(var + eps)


@register_estimator("grpo")
def grpo(scores: jax.Array, response_mask: jax.Array, group_size: int,
         kl_penalty: jax.Array | None = None, *,
         options: AdvantageOptions = AdvantageOptions()) -> jax.Array:
  """GRPO: A = (r − mean_group) / (std_group + ε), unbiased std (0 when G = 1)."""
  scores, mask, penalty = _validate(scores, response_mask, group_size, kl_penalty)
  dev = _group_deviation(_outcome_scores(scores, penalty), group_size)
  std = jnp.sqrt(jnp.square(dev).sum(axis=1, keepdims=True) / max(group_size - 1, 1))
  return _per_token(dev / (std + options.std_eps), mask)


@register_estimator("dr_grpo")
def dr_grpo(scores: jax.Array, response_mask: jax.Array, group_size: int,
            kl_penalty: jax.Array | None = None, *,
            options: AdvantageOptions = AdvantageOptions()) -> jax.Array:
  """Dr. GRPO: A = r − mean_group, without the std division (pair it with a constant-norm loss)."""
  scores, mask, penalty = _validate(scores, response_mask, group_size, kl_penalty)
  return _per_token(_group_deviation(_outcome_scores(scores, penalty), group_size), mask)


@register_estimator("rloo")
def rloo(scores: jax.Array, response_mask: jax.Array, group_size: int,
         kl_penalty: jax.Array | None = None, *,
         options: AdvantageOptions = AdvantageOptions()) -> jax.Array:
  """RLOO: A_i = r_i − mean of the other G − 1 rewards = G/(G−1)·(r_i − mean); 0 when G = 1."""
  scores, mask, penalty = _validate(scores, response_mask, group_size, kl_penalty)
  if group_size == 1:  # No other sample to form a baseline from.
    return jnp.zeros(mask.shape, jnp.float32)
  dev = _group_deviation(_outcome_scores(scores, penalty), group_size)
  return _per_token(dev * (group_size / (group_size - 1)), mask)


@register_estimator("reinforce_pp")
def reinforce_pp(scores: jax.Array, response_mask: jax.Array, group_size: int,
                 kl_penalty: jax.Array | None = None, *,
                 options: AdvantageOptions = AdvantageOptions()) -> jax.Array:
  """REINFORCE++: token rewards (score on the last response token, −β·KL on every token),
  returns-to-go with γ = 1, whitened over all valid tokens of the batch.

  The returns are a plain reverse cumulative sum; for prefix masks (all a sampler produces) this is
  EasyR1's loop with its reset after EOS. `group_size` only validates the batch layout.
  """
  scores, mask, penalty = _validate(scores, response_mask, group_size, kl_penalty)
  length = mask.shape[1]
  last = length - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # [B·G] last valid index
  at_last = (jnp.arange(length)[None, :] == last[:, None]) & mask.any(axis=1, keepdims=True)
  rewards = jnp.where(at_last, scores[:, None], 0.0)
  if penalty is not None:
    rewards = rewards - penalty
  returns = jnp.cumsum(rewards[:, ::-1], axis=1)[:, ::-1]
  return _whiten(returns, mask, options.whiten_eps)


@register_estimator("reinforce_pp_baseline")
def reinforce_pp_baseline(scores: jax.Array, response_mask: jax.Array, group_size: int,
                          kl_penalty: jax.Array | None = None, *,
                          options: AdvantageOptions = AdvantageOptions()) -> jax.Array:
  """REINFORCE++ with a group baseline: (r − β·ΣKL) − mean_group on every response token, then
  whitened over all valid tokens of the batch."""
  scores, mask, penalty = _validate(scores, response_mask, group_size, kl_penalty)
  dev = _group_deviation(_outcome_scores(scores, penalty), group_size)
  return _whiten(_per_token(dev, mask), mask, options.whiten_eps)
