"""The KL estimators and the one KL penalty configuration."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robot_r1_jax.rl import kl


# d = ref − logp = [−0.5, 1, 2, 15, −30].
KL_LOGP = np.array([-1.0, -2.0, -1.0, -1.0, -1.0], np.float32)
KL_REF = np.array([-1.5, -1.0, 1.0, 14.0, -31.0], np.float32)
KL_EXPECTED = {
    "k1": [0.5, -1.0, -2.0, -15.0, 30.0],  # −d
    "k2": [0.125, 0.5, 2.0, 112.5, 450.0],  # d²/2
    # exp(d) − d − 1: e^−.5 − .5 = .1065307, e − 2 = .7182818, e² − 3 = 4.389056; then d = 15
    # gives 3.3e6 and d = −30 (clamped to −20) gives 19, both clamped to 10.
    "k3": [0.1065307, 0.7182818, 4.389056, 10.0, 10.0],
}


@pytest.mark.parametrize("name", sorted(KL_EXPECTED))
def test_kl_estimators_hand_computed(name):
  out = kl.kl_divergence(jnp.asarray(KL_LOGP), jnp.asarray(KL_REF), name)
  np.testing.assert_allclose(out, KL_EXPECTED[name], rtol=1e-6)


def test_k3_gradient_is_finite_where_exp_would_overflow():
  grad = jax.grad(lambda lp: kl.kl_k3(lp, jnp.array([200.0, -200.0, 0.5])).sum())(
      jnp.zeros(3))
  assert np.isfinite(grad).all()
  np.testing.assert_allclose(grad, [0.0, 0.0, -(math.exp(0.5) - 1)], rtol=1e-6)


def test_unknown_kl_estimator_is_named():
  with pytest.raises(ValueError, match="'k4'.*k1"):
    kl.kl_divergence(jnp.zeros(1), jnp.zeros(1), "k4")


@pytest.mark.parametrize("kwargs,match", [
    ({"coef": float("nan")}, "coef"),
    ({"coef": -1.0}, "coef"),
    ({"estimator": "k4"}, "estimator"),
    ({"placement": "both"}, "placement"),
])
def test_bad_penalty_names_the_field(kwargs, match):
  with pytest.raises(ValueError, match=f"KLPenalty.{match}"):
    kl.KLPenalty(**kwargs)


def test_penalty_is_in_the_loss_or_the_reward_and_off_at_zero():
  assert kl.KLPenalty().in_loss and not kl.KLPenalty().in_reward
  reward = kl.KLPenalty(coef=1e-3, placement="reward")
  assert reward.in_reward and not reward.in_loss and reward.active
  off = kl.KLPenalty(coef=0.0, placement="reward")
  assert not (off.active or off.in_loss or off.in_reward)
