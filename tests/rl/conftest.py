"""A toy log-linear policy shared by the loss tests: logits = features · W, padded responses."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robot_r1_jax.train.scoring import token_log_probs


@dataclasses.dataclass(frozen=True)
class ToyRollout:
  """B = 8 sequences of T = 6 tokens over a V = 11 vocabulary, with D = 5 features per position."""

  weights: jax.Array  # [D, V] the policy parameters at sampling time.
  features: jax.Array  # [B, T, D]
  targets: jax.Array  # [B, T] int32, sampled from the policy.
  mask: jax.Array  # [B, T] bool, prefixes of lengths 6, 5, 4, 3, 2, 1, 0, 6.
  advantages: jax.Array  # [B, T] f32, 0 on padding.
  old_logp: jax.Array  # [B, T] f32, log-probs under `weights`.
  ref_logp: jax.Array  # [B, T] f32, log-probs under a perturbed reference.

  @staticmethod
  def logits(weights: jax.Array, features: jax.Array) -> jax.Array:
    """[B, T, V] logits of the log-linear policy."""
    return jnp.einsum("btd,dv->btv", features, weights)


@pytest.fixture(scope="session")
def toy_rollout() -> ToyRollout:
  rng = np.random.default_rng(0)
  b, t, d, v = 8, 6, 5, 11
  weights = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
  features = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  logits = ToyRollout.logits(weights, features)
  # Gumbel-max sampling in numpy: cheaper than compiling jax.random for one fixture.
  targets = jnp.asarray(np.argmax(np.asarray(logits) + rng.gumbel(size=logits.shape), axis=-1),
                        jnp.int32)
  lengths = np.array([6, 5, 4, 3, 2, 1, 0, 6])
  mask = jnp.asarray(np.arange(t)[None, :] < lengths[:, None])
  advantages = jnp.where(mask, jnp.asarray(rng.normal(size=(b, 1)), jnp.float32), 0.0)
  ref_weights = weights + 0.3 * jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
  return ToyRollout(
      weights=weights, features=features, targets=targets, mask=mask, advantages=advantages,
      old_logp=token_log_probs(logits, targets),
      ref_logp=token_log_probs(ToyRollout.logits(ref_weights, features), targets))
