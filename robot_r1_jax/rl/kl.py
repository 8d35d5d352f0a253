"""The KL penalty to the reference policy: Schulman's estimators and the one β that weighs them.

Estimators take per-token log-probs of the sampled tokens, d = ref_logp − logp:
k1 = −d (unbiased, high variance, can be negative), k2 = d²/2 (biased, low variance, ≥ 0),
k3 = exp(d) − d − 1 (unbiased, low variance, ≥ 0; EasyR1's low_var_kl).

`KLPenalty` configures one term: β, the estimator, and where β·KL goes — into the loss
(`losses.policy_loss`, the Robot-R1 recipe) or into the reward (through the advantage estimator,
as REINFORCE++ does). A learner may run one term of each placement, each with its own β and
estimator, as verl does (`kl_loss_coef`/`kl_loss_type` beside `kl_ctrl.kl_coef`/`kl_penalty`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp


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
  """Per-token KL(π‖π_ref) [B, R] f32 by the estimator named `estimator` in `KL_ESTIMATORS`."""
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")
  return KL_ESTIMATORS[estimator](logp, ref_logp)


PLACEMENTS = ("loss", "reward")


@dataclasses.dataclass(frozen=True)
class KLPenalty:
  """β·KL(π‖π_ref) by `estimator`, added to the loss or subtracted from the reward.

  Attributes:
    coef: β; 0 switches the penalty off, and with it the reference model.
    estimator: a name in `KL_ESTIMATORS`.
    placement: "loss" (a term of `losses.policy_loss`) or "reward" (token rewards for REINFORCE++,
      sequence scores for the outcome estimators; see `advantages`).
  """

  coef: float = 1e-2
  estimator: str = "k3"
  placement: str = "loss"

  def __post_init__(self):
    if not (math.isfinite(self.coef) and self.coef >= 0.0):
      raise ValueError(f"KLPenalty.coef={self.coef} must be finite and >= 0")
    if self.estimator not in KL_ESTIMATORS:
      raise ValueError(f"KLPenalty.estimator={self.estimator!r} is not one of "
                       f"{sorted(KL_ESTIMATORS)}")
    if self.placement not in PLACEMENTS:
      raise ValueError(f"KLPenalty.placement={self.placement!r} is not one of {list(PLACEMENTS)}")

  @property
  def active(self) -> bool:
    """Whether the penalty is on, so that reference log-probs are needed."""
    return self.coef > 0

  @property
  def in_loss(self) -> bool:
    return self.active and self.placement == "loss"

  @property
  def in_reward(self) -> bool:
    return self.active and self.placement == "reward"
