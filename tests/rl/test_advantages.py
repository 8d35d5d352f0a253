"""Advantage estimators: hand-computed values, properties, degenerate groups and padding."""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robot_r1_jax.rl import advantages as adv

# Two prompts × G = 4 samples, T = 4, response lengths 4, 3, 2, 1 | 4, 0, 2, 1.
SCORES = np.array([1, 0, 0, 0, 1, 1, 0, 0], np.float32)
LENGTHS = np.array([4, 3, 2, 1, 4, 0, 2, 1])
MASK = np.arange(4)[None, :] < LENGTHS[:, None]


def _expand(per_row: list[float]) -> np.ndarray:
  """A per-sequence advantage on each valid token of MASK, 0 on padding."""
  return np.where(MASK, np.array(per_row, np.float32)[:, None], 0.0)


# Group 1 [1, 0, 0, 0]: mean 1/4, deviations [3/4, −1/4, −1/4, −1/4], unbiased std 1/2.
# Group 2 [1, 1, 0, 0]: mean 1/2, deviations ±1/2, unbiased std sqrt(1/3) = 0.5773503.
# GRPO: 0.75 / 0.500001 = 1.499997, 0.25 / 0.500001 = 0.499999, 0.5 / 0.5773513 = 0.8660239.
# RLOO: the deviation · G/(G−1) = 4/3: 1, −1/3 | 2/3, −2/3.
# REINFORCE++ (no KL): the return on every valid token is the score; 17 valid tokens, eight 1s and
#   nine 0s: mean 8/17, unbiased var 9/34 → 1: (9/17)/sqrt(9/34) = 1.028991, 0: −0.914659.
# REINFORCE++ baseline: per-token group deviations .75 ×4, −.25 ×6, .5 ×4, −.5 ×3: mean 2/17,
#   unbiased var 0.2587316 → 1.243182, −0.7227803, 0.7516916, −1.214271.
EXPECTED = {
    "grpo": [1.499997, -0.499999, -0.499999, -0.499999,
             0.8660239, 0.8660239, -0.8660239, -0.8660239],
    "dr_grpo": [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5],
    "rloo": [1.0, -1 / 3, -1 / 3, -1 / 3, 2 / 3, 2 / 3, -2 / 3, -2 / 3],
    "reinforce_pp": [1.028991, -0.914659, -0.914659, -0.914659,
                     1.028991, 1.028991, -0.914659, -0.914659],
    "reinforce_pp_baseline": [1.243182, -0.7227803, -0.7227803, -0.7227803,
                              0.7516916, 0.7516916, -1.214271, -1.214271],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hand_computed_values(name):
  out = adv.ESTIMATORS[name](jnp.asarray(SCORES), jnp.asarray(MASK), 4)
  assert out.dtype == jnp.float32 and out.shape == MASK.shape
  np.testing.assert_allclose(out, _expand(EXPECTED[name]), rtol=2e-6, atol=1e-6)


# KL in the reward, β = 0.1, G = 2, R = 3: scores [1, 0], lengths 3 and 2, per-token KL
# [.1, .2, .3] and [.5, −.4, <nan padding>]; the estimators take the penalty β·KL.
KL_SCORES = np.array([1.0, 0.0], np.float32)
KL_MASK = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
KL = np.array([[0.1, 0.2, 0.3], [0.5, -0.4, np.nan]], np.float32)
KL_PENALTY = 0.1 * KL
# Outcome estimators: scores − β·ΣKL = [1 − .06, 0 − .01] = [.94, −.01]: deviations ±.475,
#   unbiased std .475·√2 → GRPO ±.475 / (.6717514 + 1e-6) = ±0.7071057; RLOO ±.95.
# REINFORCE++: token rewards [−.01, −.02, −.03 + 1] and [−.05, .04 + 0]; returns-to-go
#   [.94, .95, .97] and [−.01, .04]; mean .578, unbiased var .26457 →
#   [.7037822, .7232237, .7621067] and [−1.14316, −1.045953].
# REINFORCE++ baseline: ±.475 on the tokens (3 and 2 of them): mean .095, unbiased var .27075 →
#   .7302967 and −1.095445.
KL_EXPECTED = {
    "grpo": [[0.7071057] * 3, [-0.7071057] * 2 + [0.0]],
    "dr_grpo": [[0.475] * 3, [-0.475] * 2 + [0.0]],
    "rloo": [[0.95] * 3, [-0.95] * 2 + [0.0]],
    "reinforce_pp": [[0.7037822, 0.7232237, 0.7621067], [-1.14316, -1.045953, 0.0]],
    "reinforce_pp_baseline": [[0.7302967] * 3, [-1.095445] * 2 + [0.0]],
}


@pytest.mark.parametrize("name", sorted(KL_EXPECTED))
def test_hand_computed_values_with_kl_in_reward(name):
  out = adv.ESTIMATORS[name](jnp.asarray(KL_SCORES), jnp.asarray(KL_MASK), 2,
                             jnp.asarray(KL_PENALTY))
  np.testing.assert_allclose(out, KL_EXPECTED[name], rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(adv.ESTIMATORS))
def test_jit_with_static_group_size_matches_eager(name):
  fn = adv.ESTIMATORS[name]
  jitted = jax.jit(fn, static_argnums=2, static_argnames="options")
  eager = fn(jnp.asarray(KL_SCORES), jnp.asarray(KL_MASK), 2, jnp.asarray(KL_PENALTY))
  out = jitted(jnp.asarray(KL_SCORES), jnp.asarray(KL_MASK), 2, jnp.asarray(KL_PENALTY))
  np.testing.assert_allclose(out, eager, rtol=1e-6, atol=1e-7)


def test_registry_has_the_five_estimators_and_names_unknown_ones():
  assert set(adv.ESTIMATORS) == {"grpo", "dr_grpo", "rloo", "reinforce_pp",
                                 "reinforce_pp_baseline"}
  assert adv.get_estimator("rloo") is adv.rloo
  with pytest.raises(ValueError, match="'ppo'.*dr_grpo"):
    adv.get_estimator("ppo")


@pytest.mark.parametrize("kwargs,match", [
    ({"group_size": 3}, "not a multiple of group_size=3"),
    ({"group_size": 0}, "group_size=0"),
    ({"scores": np.zeros((8, 1))}, r"scores must be \[B·G\]"),
    ({"response_mask": np.ones((7, 4))}, "response_mask must be"),
    ({"kl_penalty": np.zeros((8, 3))}, "kl_penalty must have the response_mask shape"),
])
def test_bad_shapes_name_the_argument(kwargs, match):
  args = {"scores": SCORES, "response_mask": MASK, "group_size": 4, "kl_penalty": None} | kwargs
  with pytest.raises(ValueError, match=match):
    adv.grpo(args["scores"], args["response_mask"], args["group_size"], args["kl_penalty"])


def test_bad_options_are_rejected():
  with pytest.raises(ValueError, match="AdvantageOptions.std_eps"):
    adv.AdvantageOptions(std_eps=-1.0)


# ---------------------------------------------------------------------------------------------
# Properties.


# Fixed shapes and few group sizes, so examples reuse a handful of compilations: 12 rows hold
# 12/G groups of G, T = 5.
ROWS, LENGTH = 12, 5
JITTED = {name: jax.jit(fn, static_argnums=2, static_argnames="options")
          for name, fn in adv.ESTIMATORS.items()}


@st.composite
def batches(draw, min_length: int = 0, constant_groups: bool = False):
  """(scores [B·G], mask [B·G, T], G, kl [B·G, T] with nan on padding)."""
  g = draw(st.sampled_from([1, 3, 4]))
  value = st.floats(-10, 10, width=32)
  if constant_groups:
    scores = np.repeat(np.array(draw(st.lists(value, min_size=ROWS // g, max_size=ROWS // g))), g)
  else:
    scores = np.array(draw(st.lists(value, min_size=ROWS, max_size=ROWS)))
  lengths = np.array(draw(st.lists(st.integers(min_length, LENGTH), min_size=ROWS,
                                   max_size=ROWS)))
  mask = np.arange(LENGTH)[None, :] < lengths[:, None]
  kl = np.array(draw(st.lists(st.floats(-3, 3, width=32), min_size=ROWS * LENGTH,
                              max_size=ROWS * LENGTH))).reshape(ROWS, LENGTH)
  kl = np.where(mask, kl, np.nan)
  return scores.astype(np.float32), mask, g, kl.astype(np.float32)


_SETTINGS = hypothesis.settings(max_examples=40, deadline=None)


@_SETTINGS
@hypothesis.given(batch=batches(min_length=1))
def test_grpo_has_zero_mean_and_unit_std_per_group(batch):
  scores, mask, g, _ = batch
  out = np.asarray(JITTED["grpo"](scores, mask, g))[:, 0].reshape(-1, g)
  np.testing.assert_allclose(out.mean(axis=1), 0.0, atol=1e-5)
  if g > 1:
    std = scores.astype(np.float64).reshape(-1, g).std(axis=1, ddof=1)
    expected_std = std / (std + 1e-6)  # 1 up to ε for any group that is not constant
    np.testing.assert_allclose(out.std(axis=1, ddof=1), expected_std, rtol=1e-4, atol=1e-4)


@_SETTINGS
@hypothesis.given(batch=batches(min_length=1))
def test_rloo_is_leave_one_out_and_scaled_deviation(batch):
  scores, mask, g, _ = batch
  hypothesis.assume(g > 1)
  out = np.asarray(JITTED["rloo"](scores, mask, g))[:, 0].reshape(-1, g)
  r = scores.astype(np.float64).reshape(-1, g)
  leave_one_out = r - (r.sum(axis=1, keepdims=True) - r) / (g - 1)
  scaled = g / (g - 1) * (r - r.mean(axis=1, keepdims=True))
  np.testing.assert_allclose(out, leave_one_out, atol=2e-5)
  np.testing.assert_allclose(out, scaled, atol=2e-5)


@_SETTINGS
@hypothesis.given(batch=batches(), with_kl=st.booleans(),
                  name=st.sampled_from(["reinforce_pp", "reinforce_pp_baseline"]))
def test_reinforce_pp_is_whitened_over_valid_tokens(batch, with_kl, name):
  scores, mask, g, kl = batch
  kl = kl if with_kl else np.zeros_like(kl)  # (zeros rather than None: one compilation fewer)
  out = np.asarray(JITTED[name](scores, mask, g, 0.5 * kl))
  valid = out[mask].astype(np.float64)
  hypothesis.assume(valid.size >= 2)
  np.testing.assert_allclose(valid.mean(), 0.0, atol=1e-5)
  # Whitening divides by sqrt(var + 1e-8), so the result's variance is var / (var + 1e-8): unit
  # variance unless the input was (nearly) constant, where it is ~0 rather than nan.
  var = valid.var(ddof=1)
  assert var <= 1.0 + 1e-5
  if var > 1e-3:
    np.testing.assert_allclose(var, 1.0, rtol=1e-4)


@_SETTINGS
@hypothesis.given(batch=batches(constant_groups=True), name=st.sampled_from(sorted(JITTED)))
def test_constant_groups_give_exact_zeros(batch, name):
  scores, mask, g, _ = batch
  if name == "reinforce_pp":  # No group baseline: only a batch-wide constant is degenerate.
    scores = np.full_like(scores, scores[0])
  out = np.asarray(JITTED[name](scores, mask, g))
  np.testing.assert_array_equal(out, 0.0)


@_SETTINGS
@hypothesis.given(batch=batches(), name=st.sampled_from(sorted(JITTED)))
def test_group_size_one_is_finite_and_zero_for_group_estimators(batch, name):
  scores, mask, _, kl = batch
  out = np.asarray(JITTED[name](scores, mask, 1, kl))
  assert np.isfinite(out).all()
  if name != "reinforce_pp":  # REINFORCE++ has no group baseline; it whitens over the batch.
    np.testing.assert_array_equal(out, 0.0)


@_SETTINGS
@hypothesis.given(batch=batches(), with_kl=st.booleans(),
                  name=st.sampled_from(sorted(JITTED)))
def test_padding_gets_zero_advantage_and_nothing_is_nan(batch, with_kl, name):
  scores, mask, g, kl = batch  # kl is nan on every padding token.
  out = np.asarray(JITTED[name](scores, mask, g, kl if with_kl else None))
  assert np.isfinite(out).all()
  np.testing.assert_array_equal(out[~mask], 0.0)


@_SETTINGS
@hypothesis.given(batch=batches(), name=st.sampled_from(["grpo", "dr_grpo", "rloo"]))
def test_kl_in_reward_equals_penalised_scores(batch, name):
  scores, mask, g, kl = batch
  penalised = scores - 0.3 * np.where(mask, kl, 0.0).sum(axis=1)
  out = JITTED[name](scores, mask, g, 0.3 * kl)
  np.testing.assert_allclose(out, JITTED[name](penalised, mask, g), rtol=1e-5, atol=1e-5)
