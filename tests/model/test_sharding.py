"""Sharded forward on 8 fake CPU devices equals the unsharded one; placements follow the rules."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from robot_r1_jax.model import config as config_lib
from robot_r1_jax.model import sharding
from robot_r1_jax.model.qwen2_5_vl import init_model

from hf_reference import left_padded_batch


def test_rules_cover_every_parameter_and_are_applied(mesh8):
  model = init_model(config_lib.tiny())
  state = nnx.state(model, nnx.Param)
  shardings = sharding.param_shardings(state, mesh8)
  seen = set()
  for (path, var), (_, sh) in zip(nnx.to_flat_state(state), nnx.to_flat_state(shardings)):
    names = var.get_metadata()["out_sharding"]
    assert len(names) == var.get_value().ndim, path
    seen.update(n for n in names if n)
    want = [dict(sharding.RULES)[n] if n else None for n in names]
    for dim, got_axes, rule_axes in zip(var.get_value().shape, sh.spec, want):
      # A mesh axis is dropped only where it does not divide the dimension (tiny vocab 1031).
      assert got_axes == rule_axes or (got_axes is None and dim % 2), (path, sh.spec, want)
  assert {"embed", "mlp", "heads", "vocab", "layers"} <= seen
  # The q kernel is [L, D, N, H]: D over fsdp, N over tensor.
  assert shardings["text"]["layers"]["attn"]["q"].spec == PartitionSpec(None, "fsdp", "tensor",
                                                                         None)


def test_sharded_forward_equals_unsharded(mesh8):
  model = init_model(config_lib.tiny())
  ids, mask = left_padded_batch(np.random.default_rng(2), [11, 5, 8, 11], 11)
  want = np.asarray(model(ids, mask))

  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.param_shardings(state, mesh8))
  batch = sharding.batch_sharding(mesh8, 2)

  @jax.jit
  def forward(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)

  got = forward(state, jax.device_put(ids, batch), jax.device_put(mask, batch))
  assert len(got.sharding.device_set) == 8
  real = mask.astype(bool)
  # Only summation order differs between shardings (~1e-6 in f32).
  np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=2e-5)
