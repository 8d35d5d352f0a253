"""The package's curated public API."""

from __future__ import annotations

import robot_r1_jax.rl as rl


def test_public_names_resolve_to_the_module_objects():
  assert len(set(rl.__all__)) == len(rl.__all__)
  assert [name for name in rl.__all__ if not hasattr(rl, name)] == []
  assert rl.ESTIMATORS["grpo"] is rl.get_estimator("grpo")
  assert rl.kl_divergence is rl.kl.kl_divergence and rl.KLPenalty is rl.kl.KLPenalty
