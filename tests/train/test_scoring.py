"""Per-token log-probabilities and entropy from logits (fp32 whatever the logits' dtype)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robot_r1_jax.train import scoring


def test_token_log_probs_and_entropy_hand_computed():
  # Position 0: probabilities [1/4, 3/4, 0] (a −inf logit); position 1: uniform over 3.
  logits = jnp.array([[[0.0, math.log(3.0), -jnp.inf], [0.0, 0.0, 0.0]]])
  targets = jnp.array([[1, 2]])
  np.testing.assert_allclose(scoring.token_log_probs(logits, targets), [[-0.2876821, -1.0986123]],
                             rtol=1e-6)
  # −(1/4·ln 1/4 + 3/4·ln 3/4) = 0.5623351; ln 3 = 1.0986123.
  np.testing.assert_allclose(scoring.token_entropy(logits), [[0.5623351, 1.0986123]], rtol=1e-6)
  grad = jax.grad(lambda x: scoring.token_entropy(x).sum())(logits)
  assert np.isfinite(grad).all()


def test_token_log_probs_are_fp32_log_softmax_for_bf16_logits():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(4 * rng.normal(size=(2, 3, 50)), jnp.bfloat16)
  targets = jnp.asarray(rng.integers(0, 50, (2, 3)))
  out = scoring.token_log_probs(logits, targets)
  assert out.dtype == jnp.float32
  reference = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)),
                                  targets[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(out, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_token_log_probs_materialise_at_most_one_fp32_logits_array(dtype):
  b, t, v = 4, 64, 4096
  compiled = jax.jit(scoring.token_log_probs).lower(
      jax.ShapeDtypeStruct((b, t, v), dtype), jax.ShapeDtypeStruct((b, t), jnp.int32)).compile()
  one_fp32_logits = b * t * v * 4
  # One [B, T, V] f32 array (the bf16 upcast) plus a few [B, T] vectors at most.
  assert compiled.memory_analysis().temp_size_in_bytes <= one_fp32_logits + 16 * b * t * 4


def test_token_log_probs_rejects_mismatched_targets():
  with pytest.raises(ValueError, match=r"logits \(1, 2, 3\) and targets \(1, 3\)"):
    scoring.token_log_probs(jnp.zeros((1, 2, 3)), jnp.zeros((1, 3), jnp.int32))
