"""Reward shapers and batch filters: hand-computed values, registration, errors."""

from __future__ import annotations

import numpy as np
import pytest

from robot_r1_jax.rl import shaping


def test_overlong_penalty_is_linear_over_the_buffer():
  # L = 100, L_cache = 20: no penalty up to 80 tokens, then −(|y| − 80)/20 · 0.5 down to −0.5.
  scores = np.array([1.0, 1.0, 0.0, 1.0, 0.5], np.float32)
  lengths = np.array([50, 80, 90, 100, 95])
  truncated = lengths == 100
  shaped = shaping.REWARD_SHAPERS["overlong"](
      scores, lengths, truncated, 100, shaping.ShapingOptions(overlong_buffer=20,
                                                             overlong_penalty=0.5))
  np.testing.assert_allclose(shaped, [1.0, 1.0, -0.25, 0.5, 0.125], rtol=1e-6)
  assert shaped.dtype == np.float32
  with pytest.raises(ValueError, match="needs overlong_buffer > 0"):
    shaping.REWARD_SHAPERS["overlong"](scores, lengths, truncated, 100, shaping.ShapingOptions())


def test_informative_keeps_groups_whose_rewards_differ():
  scores = np.array([[1, 1, 1], [0, 1, 0], [0, 0, 0], [0.5, 0.5, 0.25]], np.float32)
  np.testing.assert_array_equal(shaping.BATCH_FILTERS["informative"](scores),
                                [False, True, False, True])


def test_registration_and_names(monkeypatch):
  monkeypatch.setattr(shaping, "REWARD_SHAPERS", dict(shaping.REWARD_SHAPERS))
  monkeypatch.setattr(shaping, "BATCH_FILTERS", dict(shaping.BATCH_FILTERS))

  @shaping.register_reward_shaper("brevity")
  def brevity(scores, lengths, truncated, max_new_tokens, options):
    del truncated, options
    return scores - 0.1 * lengths / max_new_tokens

  @shaping.register_batch_filter("any_correct")
  def any_correct(scores):
    return (scores >= 1).any(axis=1)

  np.testing.assert_allclose(shaping.REWARD_SHAPERS["brevity"](
      np.ones(2), np.array([10, 20]), np.zeros(2, bool), 20, shaping.ShapingOptions()), [0.95, 0.9])
  np.testing.assert_array_equal(shaping.BATCH_FILTERS["any_correct"](np.eye(2)), [True, True])
  with pytest.raises(ValueError, match="a batch filter named 'any_correct' is already registered"):
    shaping.register_batch_filter("any_correct")(any_correct)
  with pytest.raises(ValueError, match=r"unknown reward shaper 'short'; choose from \['brevity', "
                     r"'overlong'\]"):
    shaping.check_names(shaping.REWARD_SHAPERS, "reward shaper", ("short",))
  with pytest.raises(ValueError, match="overlong_buffer=-1 must be >= 0"):
    shaping.ShapingOptions(overlong_buffer=-1)
