"""The policy-gradient loss: a registered per-token objective (dual-clip PPO with asymmetric
clipping, GSPO, CISPO, or a user's), truncated importance sampling, an entropy bonus, the KL term.

Objectives live in `POLICY_LOSSES` by name and are added with `register_policy_loss`; each maps
per-token log-probs to per-token losses (`TokenTerms`), and `policy_loss` does the rest (importance
weights, aggregation, KL, entropy, statistics) the same way for all of them.

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
from typing import Callable

import jax
import jax.numpy as jnp

from robot_r1_jax.rl import kl as kl_lib

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenTerms:
  """What a policy objective gives per token [B, R]."""

  loss: jax.Array  # f32, the per-token loss (0 on padding)
  ratio: jax.Array  # f32, the importance ratio it weighed the token with (for the statistics)
  clipped: jax.Array  # bool, where its ε bound was active
  dual_clipped: jax.Array  # bool, where the dual clip was active (all False without one)


# (logp, old_logp, advantages, mask, config) -> TokenTerms; the inputs are f32 [B, R], 0 on padding,
# and the mask is bool.
PolicyObjective = Callable[..., TokenTerms]


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
  """A registered objective and what it can be combined with."""

  fn: PolicyObjective
  dual_clip: bool = False  # it applies PolicyLossConfig.dual_clip (others refuse one)
  aggregations: tuple[str, ...] = AGGREGATIONS  # the aggregations its objective is defined with


POLICY_LOSSES: dict[str, ObjectiveSpec] = {}


def register_policy_loss(name: str, *, dual_clip: bool = False,
                         aggregations: tuple[str, ...] = AGGREGATIONS
                         ) -> Callable[[PolicyObjective], PolicyObjective]:
  """Decorator: adds `fn(logp, old_logp, advantages, mask, config) -> TokenTerms` as the policy
  loss `name` (`PolicyLossConfig.kind`, `--policy_loss`)."""

  def add(fn: PolicyObjective) -> PolicyObjective:
    if name in POLICY_LOSSES:
      raise ValueError(f"a policy loss named {name!r} is already registered")
    unknown = set(aggregations) - set(AGGREGATIONS)
    if unknown:
      raise ValueError(f"policy loss {name!r}: unknown aggregations {sorted(unknown)}")
    POLICY_LOSSES[name] = ObjectiveSpec(fn, dual_clip, tuple(aggregations))
    return fn

  return add


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
  """The policy objective and its constants (defaults: the Robot-R1 paper recipe, PPO-clip). The
  KL term is `kl.KLPenalty`.

  Attributes:
    kind: a name in `POLICY_LOSSES`: `ppo_clip`, `gspo`, `cispo`, or one a user registered.
    clip_low: ε_low; the ratio is clipped to [1 − clip_low, 1 + clip_high].
    clip_high: ε_high (asymmetric, "clip-higher"; CISPO's truncation of the importance weight).
    dual_clip: c of dual-clip PPO, bounding the loss of a negative-advantage token by −c·A; None
      disables it (objectives other than PPO-clip refuse one).
    aggregation: how token losses become one number:
      `token_mean`: Σ_tokens ℓ / #tokens (the recipe);
      `seq_mean_token_mean`: mean over sequences of each sequence's token mean;
      `seq_mean_token_sum_norm`: mean over sequences of Σ_t ℓ / `sum_norm_divisor` (Dr. GRPO: a
      constant, e.g. the maximum response length, so long answers are not down-weighted).
      Sequences without valid tokens do not count towards the sequence means.
    sum_norm_divisor: the constant of `seq_mean_token_sum_norm` (required there, unused otherwise).
    tis_cap: truncated importance sampling (Yao et al. 2025, verl's tis_imp_ratio_cap): each
      token's loss is weighted by min(π_old / π_rollout, tis_cap), the trainer's probability of
      the token over the sampler's, for rollouts drawn by another numerics or layout; None: off.
    entropy_coef: an entropy bonus: the loss subtracts entropy_coef · agg(entropy).
  """

  kind: str = "ppo_clip"
  clip_low: float = 0.2
  clip_high: float = 0.3
  dual_clip: float | None = 3.0
  aggregation: str = "token_mean"
  sum_norm_divisor: float | None = None
  tis_cap: float | None = None
  entropy_coef: float = 0.0

  def __post_init__(self):
    if self.kind not in POLICY_LOSSES:
      raise ValueError(f"PolicyLossConfig.kind={self.kind!r} is not one of "
                       f"{sorted(POLICY_LOSSES)}")
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
    if self.tis_cap is not None and not (math.isfinite(self.tis_cap) and self.tis_cap >= 1.0):
      raise ValueError(f"PolicyLossConfig.tis_cap={self.tis_cap} must be >= 1 (or None)")
    if not (math.isfinite(self.entropy_coef) and self.entropy_coef >= 0.0):
      raise ValueError(f"PolicyLossConfig.entropy_coef={self.entropy_coef} must be >= 0")
    spec = POLICY_LOSSES[self.kind]
    if self.dual_clip is not None and not spec.dual_clip:
      raise ValueError(f"PolicyLossConfig.kind={self.kind!r} does not combine with dual_clip="
                       f"{self.dual_clip}: the dual clip bounds PPO-clip's per-token loss (set "
                       "dual_clip to None, --dual_clip=0)")
    if self.aggregation not in spec.aggregations:
      raise ValueError(f"PolicyLossConfig.kind={self.kind!r} does not combine with aggregation="
                       f"{self.aggregation!r}: its objective is defined with "
                       f"{' or '.join(spec.aggregations)}")


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
  tis_count: jax.Array  # i32, tokens whose truncated importance weight hit its cap.
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


def _ratio(log_ratio: jax.Array) -> jax.Array:
  # Clamped before exp (EasyR1): an overflowing exp would make gradients nan.
  return jnp.exp(jnp.clip(log_ratio, -20.0, 20.0))


def _clip_objective(ratio: jax.Array, advantages: jax.Array, mask: jax.Array,
                    config: PolicyLossConfig) -> TokenTerms:
  """max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high)) per token, 0 on padding; no dual clip."""
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - config.clip_low, 1.0 + config.clip_high)
  return TokenTerms(loss=jnp.where(mask, jnp.maximum(unclipped, clipped), 0.0), ratio=ratio,
                    clipped=mask & (clipped > unclipped), dual_clipped=jnp.zeros_like(mask))


@register_policy_loss("ppo_clip", dual_clip=True)
def ppo_clip(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
             config: PolicyLossConfig) -> TokenTerms:
  """PPO-clip with asymmetric ε and, for A < 0, the dual clip min(ℓ, −c·A) (Ye et al. 2020); the
  ratio per token, ρ = π / π_old."""
  terms = _clip_objective(_ratio(logp - old_logp), advantages, mask, config)
  if config.dual_clip is None:
    return terms
  bound = -advantages * config.dual_clip
  negative = advantages < 0
  return dataclasses.replace(
      terms, loss=jnp.where(negative, jnp.minimum(terms.loss, bound), terms.loss),
      dual_clipped=mask & negative & (terms.loss > bound))


@register_policy_loss("gspo", aggregations=("seq_mean_token_mean",))
def gspo(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
         config: PolicyLossConfig) -> TokenTerms:
  """GSPO (Zheng et al. 2025): one ratio per sequence, s = exp(mean_t log ρ_t) over its valid
  tokens, clipped per sequence (the paper's ε are 3e-4 / 4e-4). GSPO-token form: each token's
  value is s and its gradient that of sg(s)·π_t / sg(π_t), which for a sequence-constant advantage
  is GSPO's gradient; the sequence mean of token means is the paper's 1/G Σ_i."""
  tokens = jnp.maximum(mask.sum(axis=-1, keepdims=True), 1)
  sequence = (logp - old_logp).sum(axis=-1, keepdims=True) / tokens
  log_ratio = logp - jax.lax.stop_gradient(logp) + jax.lax.stop_gradient(sequence)
  return _clip_objective(_ratio(log_ratio), advantages, mask, config)


@register_policy_loss("cispo")
def cispo(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
          config: PolicyLossConfig) -> TokenTerms:
  """CISPO (MiniMax-M1, 2025): ℓ = −sg(min(ρ, 1 + ε_high))·A·log π. The importance weight is
  truncated instead of the update, so every token keeps its gradient (PPO-clip drops the gradient
  of clipped tokens). The loss value carries log π, so its level is not comparable to PPO's."""
  ratio = _ratio(logp - old_logp)
  weight = jax.lax.stop_gradient(jnp.minimum(ratio, 1.0 + config.clip_high))
  return TokenTerms(loss=jnp.where(mask, -weight * advantages * logp, 0.0), ratio=ratio,
                    clipped=mask & (ratio > 1.0 + config.clip_high),
                    dual_clipped=jnp.zeros_like(mask))


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                config: PolicyLossConfig, ref_logp: jax.Array | None = None,
                entropy: jax.Array | None = None, kl: kl_lib.KLPenalty | None = None,
                rollout_logp: jax.Array | None = None) -> LossOutput:
  """The configured objective, importance-weighted, aggregated, with its KL and entropy terms.

  Per valid token, with ratio ρ = exp(logp − old_logp), PPO-clip (the default) is
    ℓ = max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high)), and for A < 0 additionally min(ℓ, −c·A);
  with `tis_cap` each ℓ is weighted by w = min(exp(old_logp − rollout_logp), C) (no gradient); the
  loss is agg(w·ℓ) + β · agg(KL(logp, ref_logp)) − entropy_coef · agg(entropy).

  Args:
    logp: [B, R] log-probs of the sampled tokens under the policy being trained.
    old_logp: [B, R] log-probs under the policy that sampled them, computed once per rollout (if
      recomputed from the current parameters, every μ-update after the first sees ρ ≡ 1).
    advantages: [B, R] from an estimator in `advantages.ESTIMATORS`.
    mask: [B, R] 1 on valid response tokens, 0 on padding.
    config: the objective, clipping, aggregation, importance cap and entropy bonus.
    ref_logp: [B, R] log-probs under the reference policy; required with `kl`.
    entropy: [B, R] per-token entropy: summed into the metrics, and the bonus when
      `config.entropy_coef` > 0 (then required, and differentiable).
    kl: the KL term (a `KLPenalty` placed in the loss); None leaves it out.
    rollout_logp: [B, R] the sampler's log-probs of the tokens; required with `config.tis_cap`.

  Returns:
    The unreduced sums; see `finalize` and `loss_metrics`.
  """
  _check_inputs(mask, kl, ref_logp, logp=logp, old_logp=old_logp, advantages=advantages,
                entropy=entropy, rollout_logp=rollout_logp)
  if config.tis_cap is not None and rollout_logp is None:
    raise ValueError(f"rollout_logp is required with truncated importance sampling "
                     f"(PolicyLossConfig.tis_cap={config.tis_cap})")
  if config.entropy_coef and entropy is None:
    raise ValueError(f"entropy is required with an entropy bonus (PolicyLossConfig.entropy_coef="
                     f"{config.entropy_coef})")
  mask = mask.astype(bool)

  def valid(x: jax.Array) -> jax.Array:
    return jnp.where(mask, x.astype(jnp.float32), 0.0)

  # The policy-gradient term.
  logp, old_logp, advantages = valid(logp), valid(old_logp), valid(advantages)
  terms = POLICY_LOSSES[config.kind].fn(logp, old_logp, advantages, mask, config)
  per_token, tis_count = terms.loss, jnp.zeros((), jnp.int32)
  if config.tis_cap is not None:
    weight = jax.lax.stop_gradient(_ratio(old_logp - valid(rollout_logp)))
    tis_count = (mask & (weight > config.tis_cap)).sum()
    per_token = per_token * jnp.minimum(weight, config.tis_cap)
  pg_sum = _aggregate(per_token, mask, config)

  # The KL term.
  if kl is None:
    kl_coef, kl_sum = 0.0, jnp.zeros((), jnp.float32)
  else:
    per_token_kl = kl_lib.kl_divergence(logp, valid(ref_logp), kl.estimator)
    kl_coef, kl_sum = kl.coef, _aggregate(jnp.where(mask, per_token_kl, 0.0), mask, config)

  # The entropy bonus.
  bonus = 0.0
  if config.entropy_coef:
    bonus = config.entropy_coef * _aggregate(valid(entropy), mask, config)

  # Sums and statistics.
  ratio = terms.ratio
  denominator = mask.sum() if config.aggregation == "token_mean" else mask.any(axis=-1).sum()
  return LossOutput(
      loss_sum=pg_sum + kl_coef * kl_sum - bonus,
      pg_sum=pg_sum,
      kl_sum=kl_sum,
      denominator=denominator.astype(jnp.int32),
      token_count=mask.sum().astype(jnp.int32),
      clip_count=terms.clipped.sum().astype(jnp.int32),
      dual_clip_count=terms.dual_clipped.sum().astype(jnp.int32),
      ratio_sum=jnp.where(mask, ratio, 0.0).sum(),
      ratio_min=jnp.where(mask, ratio, jnp.inf).min(),
      ratio_max=jnp.where(mask, ratio, -jnp.inf).max(),
      approx_kl_sum=jnp.where(mask, kl_lib.kl_k3(old_logp, logp), 0.0).sum(),
      tis_count=tis_count.astype(jnp.int32),
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
      "tis_truncated_fraction": out.tis_count / tokens,
  }
  if out.entropy_sum is not None:
    metrics["entropy"] = out.entropy_sum / tokens
  return metrics
