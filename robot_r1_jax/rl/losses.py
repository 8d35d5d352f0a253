"""The clipped policy-gradient loss (dual-clip PPO with asymmetric clipping) and its KL term.

The loss is written against per-token log-probabilities [B, R] so it does not depend on the model.
`policy_loss` returns *unreduced* sums and their denominator (`LossOutput`) rather than a mean:
summing the outputs of micro-batches (`LossOutput.merge`) and then calling `finalize` gives exactly
the full-batch loss, and the gradients of `loss_sum` add up the same way (`train.update` divides
the summed gradients by the summed denominator).

Padding (mask 0) may hold anything, including inf and nan from a padded forward pass: every
per-token input is replaced by 0 under the mask with `where` before any arithmetic, so padding
contributes zero loss and zero (never nan) gradient.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from robot_r1_jax.rl import kl as kl_lib

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
  """The PPO-clip objective (defaults: the Robot-R1 paper recipe). The KL term is `kl.KLPenalty`.

  Attributes:
    clip_low: ε_low; the ratio is clipped to [1 − clip_low, 1 + clip_high].
    clip_high: ε_high (asymmetric, "clip-higher").
    dual_clip: c of dual-clip PPO, bounding the loss of a negative-advantage token by −c·A; None
      disables it.
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
  aggregation: str = "token_mean"
  sum_norm_divisor: float | None = None

  def __post_init__(self):
    if not 0.0 <= self.clip_low < 1.0:
      raise ValueError(f"PolicyLossConfig.clip_low={self.clip_low} must be in [0, 1)")
    if not (math.isfinite(self.clip_high) and self.clip_high >= 0.0):
      raise ValueError(f"PolicyLossConfig.clip_high={self.clip_high} must be finite and >= 0")
    if self.dual_clip is not None and not (math.isfinite(self.dual_clip) and self.dual_clip > 1.0):
      raise ValueError(f"PolicyLossConfig.dual_clip={self.dual_clip} must be > 1 (or None)")
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"PolicyLossConfig.aggregation={self.aggregation!r} is not one of "
                       f"{list(AGGREGATIONS)}")
    if self.aggregation == "seq_mean_token_sum_norm" and not (
        self.sum_norm_divisor is not None and math.isfinite(self.sum_norm_divisor) and
        self.sum_norm_divisor > 0):
      raise ValueError(f"PolicyLossConfig.sum_norm_divisor={self.sum_norm_divisor} must be a "
                       "positive constant for aggregation='seq_mean_token_sum_norm'")


_MIN_FIELDS, _MAX_FIELDS = ("ratio_min",), ("ratio_max",)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossOutput:
  """Unreduced sums of one (micro-)batch; a pytree, so it can leave `jax.jit`.

  `loss_sum`, `pg_sum` and `kl_sum` are numerators of the configured aggregation (divide by
  `denominator`); the other sums run over valid tokens (divide by `token_count`).
  """

  loss_sum: jax.Array  # f32, aggregated pg + β · kl: differentiate this.
  pg_sum: jax.Array  # f32, aggregated clipped policy-gradient loss.
  kl_sum: jax.Array  # f32, aggregated KL to the reference (0 without a KL term).
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
  """The numerator of the configured aggregation of per-token values [B, R] (0 on padding)."""
  if config.aggregation == "token_mean":
    return per_token.sum()
  per_sequence = per_token.sum(axis=-1)
  if config.aggregation == "seq_mean_token_mean":
    return (per_sequence / jnp.maximum(mask.sum(axis=-1), 1)).sum()
  return per_sequence.sum() / config.sum_norm_divisor


def _check_inputs(mask: jax.Array, kl: kl_lib.KLPenalty | None, ref_logp: jax.Array | None,
                  **per_token: jax.Array | None) -> None:
  """Shape and argument checks (static: they run once, at trace time)."""
  if mask.ndim != 2:
    raise ValueError(f"mask must be [B, R], got shape {mask.shape}")
  for name, value in dict(per_token, ref_logp=ref_logp).items():
    if value is not None and value.shape != mask.shape:
      raise ValueError(f"{name} has shape {value.shape}, expected the mask shape {mask.shape}")
  if kl is not None:
    if kl.placement != "loss":
      raise ValueError(f"a KLPenalty placed in the {kl.placement!r} goes to the advantage "
                       "estimator, not to policy_loss")
    if ref_logp is None:
      raise ValueError(f"ref_logp is required with a KL term in the loss (KLPenalty.coef={kl.coef})")


def _clipped(ratio: jax.Array, advantages: jax.Array, mask: jax.Array,
             config: PolicyLossConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-token dual-clip PPO loss [B, R] (0 on padding) and the ε- and dual-clip counts."""
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
  return jnp.where(mask, per_token, 0.0), clip_count, dual_clip_count


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                config: PolicyLossConfig, ref_logp: jax.Array | None = None,
                entropy: jax.Array | None = None, kl: kl_lib.KLPenalty | None = None
                ) -> LossOutput:
  """Dual-clip PPO loss with asymmetric clipping and an optional KL-to-reference term.

  Per valid token, with ratio ρ = exp(logp − old_logp):
    ℓ = max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high)), and for A < 0 additionally min(ℓ, −c·A);
  the loss is agg(ℓ) + β · agg(KL(logp, ref_logp)) when `kl` is given.

  Args:
    logp: [B, R] log-probs of the sampled tokens under the policy being trained.
    old_logp: [B, R] log-probs under the policy that sampled them, computed once per rollout (if
      recomputed from the current parameters, every μ-update after the first sees ρ ≡ 1).
    advantages: [B, R] from an estimator in `advantages.ESTIMATORS`.
    mask: [B, R] 1 on valid response tokens, 0 on padding.
    config: clipping and aggregation.
    ref_logp: [B, R] log-probs under the reference policy; required with `kl`.
    entropy: [B, R] per-token entropy, only summed into the metrics (no entropy bonus).
    kl: the KL term (a `KLPenalty` placed in the loss); None leaves it out.

  Returns:
    The unreduced sums; see `finalize` and `loss_metrics`.
  """
  _check_inputs(mask, kl, ref_logp, logp=logp, old_logp=old_logp, advantages=advantages,
                entropy=entropy)
  mask = mask.astype(bool)

  def valid(x: jax.Array) -> jax.Array:
    return jnp.where(mask, x.astype(jnp.float32), 0.0)

  # The policy-gradient term.
  logp, old_logp, advantages = valid(logp), valid(old_logp), valid(advantages)
  # The log-ratio is clamped before exp (EasyR1): an overflowing exp would make gradients nan.
  ratio = jnp.exp(jnp.clip(logp - old_logp, -20.0, 20.0))
  per_token, clip_count, dual_clip_count = _clipped(ratio, advantages, mask, config)
  pg_sum = _aggregate(per_token, mask, config)

  # The KL term.
  if kl is None:
    kl_coef, kl_sum = 0.0, jnp.zeros((), jnp.float32)
  else:
    per_token_kl = kl_lib.kl_divergence(logp, valid(ref_logp), kl.estimator)
    kl_coef, kl_sum = kl.coef, _aggregate(jnp.where(mask, per_token_kl, 0.0), mask, config)

  # Sums and statistics.
  denominator = mask.sum() if config.aggregation == "token_mean" else mask.any(axis=-1).sum()
  return LossOutput(
      loss_sum=pg_sum + kl_coef * kl_sum,
      pg_sum=pg_sum,
      kl_sum=kl_sum,
      denominator=denominator.astype(jnp.int32),
      token_count=mask.sum().astype(jnp.int32),
      clip_count=clip_count.astype(jnp.int32),
      dual_clip_count=dual_clip_count.astype(jnp.int32),
      ratio_sum=jnp.where(mask, ratio, 0.0).sum(),
      ratio_min=jnp.where(mask, ratio, jnp.inf).min(),
      ratio_max=jnp.where(mask, ratio, -jnp.inf).max(),
      approx_kl_sum=jnp.where(mask, kl_lib.kl_k3(old_logp, logp), 0.0).sum(),
      entropy_sum=None if entropy is None else valid(entropy).sum(),
  )


def _safe(count: jax.Array) -> jax.Array:
  """A denominator that is never 0: an empty batch has all-zero sums and yields 0, not nan."""
  return jnp.maximum(count, 1).astype(jnp.float32)


def finalize(out: LossOutput) -> jax.Array:
  """The scalar loss of everything summed into `out`."""
  return out.loss_sum / _safe(out.denominator)


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
