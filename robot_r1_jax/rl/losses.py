"""Token log-probabilities, entropy, KL estimators and the clipped policy-gradient loss.

The loss is written against per-token log-probabilities [B, T] so it does not depend on the model.
`policy_loss` returns *unreduced* sums and their denominator (`LossOutput`) rather than a mean:
summing the outputs of micro-batches (`LossOutput.merge`) and then calling `finalize` gives exactly
the full-batch loss, and the gradients of `loss_sum` add up the same way (`finalize_grads`).

Padding (mask 0) may hold anything, including inf and nan from a padded forward pass: every
per-token input is replaced by 0 under the mask with `where` before any arithmetic, so padding
contributes zero loss and zero (never nan) gradient.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

# ---------------------------------------------------------------------------------------------
# Log-probabilities and entropy from logits.


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log π(target_t) for each position: logits [B, T, V], integer targets [B, T] → [B, T] f32.

  The log-softmax is taken in fp32 whatever the logits dtype (DESIGN.md numerics), but only its
  [B, T] normaliser is formed: the upcast, max and exp-sum fuse into reductions under jit, and the
  target logit is gathered from the original array (a bf16 → f32 cast is exact). No [B, T, V] fp32
  array beyond the upcast input is materialised (see the memory test).
  """
  if logits.shape[:-1] != targets.shape:
    raise ValueError(f"logits {logits.shape} and targets {targets.shape} disagree on [B, T]")
  # fp32: a bf16 logsumexp over a 150K vocabulary loses ~2 significant digits.
  normaliser = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked.astype(jnp.float32) - normaliser


def token_entropy(logits: jax.Array) -> jax.Array:
  """Entropy of the next-token distribution at each position: logits [B, T, V] → [B, T] f32."""
  logits = logits.astype(jnp.float32)  # fp32 softmax, as for the log-probs.
  log_p = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  p = jnp.exp(log_p)
  # A vocabulary entry masked to −inf has p = 0 and log p = −inf, and 0·(−inf) is nan. Replacing
  # log p (not the product) keeps the gradient finite too.
  return -(p * jnp.where(p > 0, log_p, 0.0)).sum(axis=-1)


# ---------------------------------------------------------------------------------------------
# KL estimators, from per-token log-probs of the sampled tokens (Schulman's k1/k2/k3).


def kl_k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """k1 = −d with d = ref_logp − logp: unbiased for KL(π‖π_ref), high variance, can be negative."""
  return logp.astype(jnp.float32) - ref_logp.astype(jnp.float32)


def kl_k2(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """k2 = d²/2: biased, low variance, ≥ 0."""
  return 0.5 * jnp.square(ref_logp.astype(jnp.float32) - logp.astype(jnp.float32))


def kl_k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """k3 = exp(d) − d − 1, clamped to ±10: unbiased, low variance, ≥ 0 (EasyR1's low_var_kl).

  d is first clamped to ±20 as EasyR1 does: exp(d) overflows f32 from d ≈ 89, and the gradient of
  the saturated output clamp (0) times an infinite exp would be nan.
  """
  d = jnp.clip(ref_logp.astype(jnp.float32) - logp.astype(jnp.float32), -20.0, 20.0)
  return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)


KL_ESTIMATORS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_divergence(logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
  """Per-token KL(π‖π_ref) [B, T] f32 by the estimator named `estimator` in `KL_ESTIMATORS`."""
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")
  return KL_ESTIMATORS[estimator](logp, ref_logp)


# ---------------------------------------------------------------------------------------------
# The clipped policy loss.

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
  """The PPO-clip objective and its KL term (defaults: the Robot-R1 paper recipe).

  Attributes:
    clip_low: ε_low; the ratio is clipped to [1 − clip_low, 1 + clip_high].
    clip_high: ε_high (asymmetric, "clip-higher").
    dual_clip: c of dual-clip PPO, bounding the loss of a negative-advantage token by −c·A; None
      disables it.
    kl_coef: β of the KL-to-reference term in the loss; 0 disables it (e.g. when the KL goes into
      the reward through the advantage estimator instead).
    kl_estimator: a name in `KL_ESTIMATORS`.
    aggregation: how token losses become one number:
      `token_mean`: Σ_tokens ℓ / #tokens (the recipe);
      `seq_mean_token_mean`: mean over sequences of each sequence's token mean;
      `seq_mean_token_sum_norm`: mean over sequences of Σ_t ℓ / `sum_norm_divisor` (Dr. GRPO: a
      constant, e.g. the maximum response length, so long answers are not down-weighted).
      Sequences without valid tokens do not count towards the sequence means.
    sum_norm_divisor: the constant of `seq_mean_token_sum_norm` (required there, unused otherwise).
  """

  clip_low: float = 0.2
  clip_high: float = 0.3
  dual_clip: float | None = 3.0
  kl_coef: float = 1e-2
  kl_estimator: str = "k3"
  aggregation: str = "token_mean"
  sum_norm_divisor: float | None = None

  def __post_init__(self):
    if not 0.0 <= self.clip_low < 1.0:
      raise ValueError(f"PolicyLossConfig.clip_low={self.clip_low} must be in [0, 1)")
    if not (math.isfinite(self.clip_high) and self.clip_high >= 0.0):
      raise ValueError(f"PolicyLossConfig.clip_high={self.clip_high} must be finite and >= 0")
    if self.dual_clip is not None and not (math.isfinite(self.dual_clip) and self.dual_clip > 1.0):
      raise ValueError(f"PolicyLossConfig.dual_clip={self.dual_clip} must be > 1 (or None)")
    if not (math.isfinite(self.kl_coef) and self.kl_coef >= 0.0):
      raise ValueError(f"PolicyLossConfig.kl_coef={self.kl_coef} must be finite and >= 0")
    if self.kl_estimator not in KL_ESTIMATORS:
      raise ValueError(f"PolicyLossConfig.kl_estimator={self.kl_estimator!r} is not one of "
                       f"{sorted(KL_ESTIMATORS)}")
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"PolicyLossConfig.aggregation={self.aggregation!r} is not one of "
                       f"{list(AGGREGATIONS)}")
    if self.aggregation == "seq_mean_token_sum_norm" and not (
        self.sum_norm_divisor is not None and math.isfinite(self.sum_norm_divisor) and
        self.sum_norm_divisor > 0):
      raise ValueError(f"PolicyLossConfig.sum_norm_divisor={self.sum_norm_divisor} must be a "
                       "positive constant for aggregation='seq_mean_token_sum_norm'")


_MIN_FIELDS, _MAX_FIELDS = ("ratio_min",), ("ratio_max",)


@struct.dataclass
class LossOutput:
  """Unreduced sums of one (micro-)batch; a pytree, so it can leave `jax.jit`.

  `loss_sum`, `pg_sum` and `kl_sum` are numerators of the configured aggregation (divide by
  `denominator`); the other sums run over valid tokens (divide by `token_count`).
  """

  loss_sum: jax.Array  # f32, aggregated pg + kl_coef · kl: differentiate this.
  pg_sum: jax.Array  # f32, aggregated clipped policy-gradient loss.
  kl_sum: jax.Array  # f32, aggregated KL to the reference (0 without ref_logp).
  denominator: jax.Array  # i32, #tokens (token_mean) or #sequences with a valid token.
  token_count: jax.Array  # i32, #valid tokens.
  clip_count: jax.Array  # i32, tokens where the ε clip was active.
  dual_clip_count: jax.Array  # i32, tokens where the dual clip was active.
  ratio_sum: jax.Array  # f32, Σ π/π_old.
  ratio_min: jax.Array  # f32 (+inf when there is no valid token).
  ratio_max: jax.Array  # f32 (−inf when there is no valid token).
  approx_kl_sum: jax.Array  # f32, Σ k3 estimate of KL(π_old‖π): how far this update has moved.
  entropy_sum: jax.Array | None = None  # f32, Σ entropy, when the entropy was passed.

  def merge(self, other: LossOutput) -> LossOutput:
    """The output of the union of two micro-batches (sums add, extremes combine)."""
    if (self.entropy_sum is None) != (other.entropy_sum is None):
      raise ValueError("cannot merge LossOutputs computed with and without entropy")
    values = {}
    for field in dataclasses.fields(self):
      a, b = getattr(self, field.name), getattr(other, field.name)
      if a is None:
        values[field.name] = None
      elif field.name in _MIN_FIELDS:
        values[field.name] = jnp.minimum(a, b)
      elif field.name in _MAX_FIELDS:
        values[field.name] = jnp.maximum(a, b)
      else:
        values[field.name] = a + b
    return LossOutput(**values)


def _aggregate(per_token: jax.Array, mask: jax.Array, config: PolicyLossConfig) -> jax.Array:
  """The numerator of the configured aggregation of per-token values [B, T] (0 on padding)."""
  if config.aggregation == "token_mean":
    return per_token.sum()
  per_sequence = per_token.sum(axis=-1)
  if config.aggregation == "seq_mean_token_mean":
    return (per_sequence / jnp.maximum(mask.sum(axis=-1), 1)).sum()
  return per_sequence.sum() / config.sum_norm_divisor


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                config: PolicyLossConfig, ref_logp: jax.Array | None = None,
                entropy: jax.Array | None = None) -> LossOutput:
  """Dual-clip PPO loss with asymmetric clipping and an optional KL-to-reference term.

  Per valid token, with ratio ρ = exp(logp − old_logp):
    ℓ = max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high)), and for A < 0 additionally min(ℓ, −c·A);
  the loss is agg(ℓ) + kl_coef · agg(KL(logp, ref_logp)).

  Args:
    logp: [B, T] log-probs of the sampled tokens under the policy being trained.
    old_logp: [B, T] log-probs under the policy that sampled them, computed once per rollout (if
      recomputed from the current parameters, every μ-update after the first sees ρ ≡ 1).
    advantages: [B, T] from an estimator in `advantages.ESTIMATORS`.
    mask: [B, T] 1 on valid response tokens, 0 on padding.
    config: clipping, KL and aggregation.
    ref_logp: [B, T] log-probs under the reference policy; required when `config.kl_coef > 0`.
    entropy: [B, T] per-token entropy, only summed into the metrics (no entropy bonus).

  Returns:
    The unreduced sums; see `finalize` and `loss_metrics`.
  """
  if mask.ndim != 2:
    raise ValueError(f"mask must be [B, T], got shape {mask.shape}")
  named = {"logp": logp, "old_logp": old_logp, "advantages": advantages, "ref_logp": ref_logp,
           "entropy": entropy}
  for name, value in named.items():
    if value is not None and value.shape != mask.shape:
      raise ValueError(f"{name} has shape {value.shape}, expected the mask shape {mask.shape}")
  if config.kl_coef > 0 and ref_logp is None:
    raise ValueError(f"ref_logp is required with PolicyLossConfig.kl_coef={config.kl_coef}")
  mask = mask.astype(bool)

  def valid(x: jax.Array) -> jax.Array:
    return jnp.where(mask, x.astype(jnp.float32), 0.0)

  logp, old_logp, advantages = valid(logp), valid(old_logp), valid(advantages)
  # The log-ratio is clamped before exp (EasyR1): an overflowing exp would make gradients nan.
  ratio = jnp.exp(jnp.clip(logp - old_logp, -20.0, 20.0))
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - config.clip_low, 1.0 + config.clip_high)
  per_token = jnp.maximum(unclipped, clipped)
  clip_count = (mask & (clipped > unclipped)).sum()
  if config.dual_clip is None:
    dual_clip_count = jnp.zeros((), jnp.int32)
  else:
    bound = -advantages * config.dual_clip
    negative = advantages < 0
    dual_clip_count = (mask & negative & (per_token > bound)).sum()
    per_token = jnp.where(negative, jnp.minimum(per_token, bound), per_token)
  per_token = jnp.where(mask, per_token, 0.0)

  pg_sum = _aggregate(per_token, mask, config)
  if ref_logp is None:
    kl_sum = jnp.zeros((), jnp.float32)
  else:
    kl = jnp.where(mask, kl_divergence(logp, valid(ref_logp), config.kl_estimator), 0.0)
    kl_sum = _aggregate(kl, mask, config)
  if config.aggregation == "token_mean":
    denominator = mask.sum()
  else:
    denominator = mask.any(axis=-1).sum()
  return LossOutput(
      loss_sum=pg_sum + config.kl_coef * kl_sum,
      pg_sum=pg_sum,
      kl_sum=kl_sum,
      denominator=denominator.astype(jnp.int32),
      token_count=mask.sum().astype(jnp.int32),
      clip_count=clip_count.astype(jnp.int32),
      dual_clip_count=dual_clip_count.astype(jnp.int32),
      ratio_sum=jnp.where(mask, ratio, 0.0).sum(),
      ratio_min=jnp.where(mask, ratio, jnp.inf).min(),
      ratio_max=jnp.where(mask, ratio, -jnp.inf).max(),
      approx_kl_sum=jnp.where(mask, kl_k3(old_logp, logp), 0.0).sum(),
      entropy_sum=None if entropy is None else valid(entropy).sum(),
  )


def _safe(count: jax.Array) -> jax.Array:
  """A denominator that is never 0: an empty batch has all-zero sums and yields 0, not nan."""
  return jnp.maximum(count, 1).astype(jnp.float32)


def finalize(out: LossOutput) -> jax.Array:
  """The scalar loss of everything summed into `out`."""
  return out.loss_sum / _safe(out.denominator)


def finalize_grads(grads: Any, out: LossOutput) -> Any:
  """Gradients of `finalize(out)` from the summed gradients of `loss_sum` (same normaliser)."""
  scale = 1.0 / _safe(out.denominator)
  return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)


def loss_metrics(out: LossOutput) -> dict[str, jax.Array]:
  """Scalars for logging: losses, clip fractions, ratio statistics, approx KL, entropy."""
  tokens = _safe(out.token_count)
  has_tokens = out.token_count > 0
  metrics = {
      "loss": finalize(out),
      "pg_loss": out.pg_sum / _safe(out.denominator),
      "kl_loss": out.kl_sum / _safe(out.denominator),
      "clip_fraction": out.clip_count / tokens,
      "dual_clip_fraction": out.dual_clip_count / tokens,
      "ratio_mean": jnp.where(has_tokens, out.ratio_sum / tokens, 1.0),
      # With no valid token there is no ratio; report the on-policy value instead of ±inf.
      "ratio_min": jnp.where(has_tokens, out.ratio_min, 1.0),
      "ratio_max": jnp.where(has_tokens, out.ratio_max, 1.0),
      "approx_kl": out.approx_kl_sum / tokens,
  }
  if out.entropy_sum is not None:
    metrics["entropy"] = out.entropy_sum / tokens
  return metrics
