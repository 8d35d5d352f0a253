"""The jitted loss step sharded over 8 fake CPU devices equals the single-device computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from robot_r1_jax.rl import losses, sharded_loss


@pytest.fixture(scope="module")
def mesh() -> Mesh:
  assert jax.device_count() == 8, "tests/conftest.py sets up 8 fake CPU devices"
  return Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))


def _batch(rollout) -> sharded_loss.LossBatch:
  return sharded_loss.LossBatch(targets=rollout.targets, old_logp=rollout.old_logp,
                                advantages=rollout.advantages, mask=rollout.mask,
                                ref_logp=rollout.ref_logp)


def test_sharded_loss_and_grads_equal_single_device(toy_rollout, mesh):
  # Per-sequence means, the k3 KL term and dual clipping all take part.
  config = losses.PolicyLossConfig(aggregation="seq_mean_token_mean")
  weights = toy_rollout.weights + 0.3 * jnp.asarray(
      np.random.default_rng(5).normal(size=toy_rollout.weights.shape), jnp.float32)
  batch = _batch(toy_rollout)

  def single_device(w):
    out = sharded_loss.loss_from_logits(toy_rollout.logits(w, toy_rollout.features), batch, config)
    return out.loss_sum, out

  grads, expected = jax.jit(jax.grad(single_device, has_aux=True))(weights)
  assert expected.entropy_sum is not None and int(expected.clip_count) > 0

  step = sharded_loss.make_sharded_loss(mesh, config, toy_rollout.logits)
  features = sharded_loss.shard_batch(toy_rollout.features, mesh)
  placed = sharded_loss.shard_batch(batch, mesh)
  compiled = step.lower(weights, features, placed).compile()
  result = compiled(weights, features, placed)

  for name in ("loss_sum", "pg_sum", "kl_sum", "ratio_sum", "ratio_min", "ratio_max",
               "approx_kl_sum", "entropy_sum"):
    np.testing.assert_allclose(getattr(result.output, name), getattr(expected, name), rtol=1e-5,
                               atol=1e-6, err_msg=name)
  for name in ("denominator", "token_count", "clip_count", "dual_clip_count"):
    assert int(getattr(result.output, name)) == int(getattr(expected, name)), name
  np.testing.assert_allclose(result.grads, grads, rtol=1e-5, atol=1e-6)
  # The batch really is split: the compiled step reduces across devices.
  assert "all-reduce" in compiled.as_text()


def test_shard_batch_splits_the_batch_axis_over_data_and_fsdp(toy_rollout, mesh):
  placed = sharded_loss.shard_batch(_batch(toy_rollout), mesh)
  assert placed.mask.sharding.spec == PartitionSpec(("data", "fsdp"), None)
  # 8 rows over 4 batch shards (replicated over `tensor`): 2 rows per device.
  assert {s.data.shape for s in placed.targets.addressable_shards} == {(2, 6)}


def test_batch_not_divisible_by_the_mesh_is_named(toy_rollout, mesh):
  with pytest.raises(ValueError, match=r"batch\.mask has shape \(6, 6\).*data×fsdp = 4"):
    sharded_loss.shard_batch(_batch(toy_rollout).replace(mask=toy_rollout.mask[:6]), mesh)
  step = sharded_loss.make_sharded_loss(mesh, losses.PolicyLossConfig(), toy_rollout.logits)
  with pytest.raises(ValueError, match=r"inputs has shape \(6, 6, 5\)"):
    step(toy_rollout.weights, toy_rollout.features[:6], _batch(toy_rollout))


def test_mesh_with_other_axes_is_rejected(toy_rollout):
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("batch", "model"))
  with pytest.raises(ValueError, match=r"mesh axes \('batch', 'model'\)"):
    sharded_loss.make_sharded_loss(mesh, losses.PolicyLossConfig(), toy_rollout.logits)
