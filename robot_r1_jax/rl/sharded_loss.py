"""The policy loss from logits, and a jitted loss-and-gradient step sharded over a device mesh.

The batch axis B is split over the mesh axes (`data`, `fsdp`) through `model.sharding`'s rules; the
math is `losses.policy_loss` unchanged: its sums over B become cross-device reductions inserted by
XLA, so the result equals the single-device one up to f32 summation order.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import jax
from flax import struct
from jax.sharding import Mesh

from robot_r1_jax.model.sharding import MESH_AXES, batch_sharding
from robot_r1_jax.rl import losses

Params = TypeVar("Params")


@struct.dataclass
class LossBatch:
  """The per-token training data of one (micro-)batch; every field is [B, T]."""

  targets: jax.Array  # int, the sampled tokens (aligned with the logits' positions).
  old_logp: jax.Array  # f32, log-probs under the sampling policy, once per rollout.
  advantages: jax.Array  # f32
  mask: jax.Array  # 1 on response tokens, 0 on prompt and padding.
  ref_logp: jax.Array | None = None  # f32, reference-policy log-probs (for a KL term).


@struct.dataclass
class LossAndGrad:
  """`output` holds the unreduced sums; `grads` are d loss_sum / d params (unnormalised, so
  micro-batch gradients add up; `losses.finalize_grads` divides by the summed denominator)."""

  output: losses.LossOutput
  grads: Any  # the params pytree


def loss_from_logits(logits: jax.Array, batch: LossBatch,
                     config: losses.PolicyLossConfig) -> losses.LossOutput:
  """`losses.policy_loss` on logits [B, T, V]: fp32 target log-probs, the entropy as a metric."""
  logp = losses.token_log_probs(logits, batch.targets)
  # The entropy is only logged; no gradient should flow through the metric.
  entropy = jax.lax.stop_gradient(losses.token_entropy(logits))
  return losses.policy_loss(logp, batch.old_logp, batch.advantages, batch.mask, config,
                            ref_logp=batch.ref_logp, entropy=entropy)


def _check_mesh(mesh: Mesh) -> int:
  """The number of batch shards, after checking the mesh has the project's axes."""
  if tuple(mesh.axis_names) != MESH_AXES:
    raise ValueError(f"mesh axes {tuple(mesh.axis_names)} must be {MESH_AXES}")
  return mesh.shape["data"] * mesh.shape["fsdp"]


def _check_batch(tree: Any, shards: int, name: str) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if leaf.ndim == 0 or leaf.shape[0] % shards:
      raise ValueError(f"{name}{jax.tree_util.keystr(path)} has shape {leaf.shape}: its batch axis "
                       f"must be a multiple of data×fsdp = {shards} mesh devices")


def shard_batch(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf (batch-major) with B split over (`data`, `fsdp`), the rest replicated."""
  _check_batch(tree, _check_mesh(mesh), "batch")
  return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim)), tree)


def make_sharded_loss(
    mesh: Mesh, config: losses.PolicyLossConfig, logits_fn: Callable[[Params, Any], jax.Array]
) -> Callable[[Params, Any, LossBatch], LossAndGrad]:
  """A jitted `step(params, inputs, batch) -> LossAndGrad` with the batch sharded over the mesh.

  Args:
    mesh: a mesh with axes ('data', 'fsdp', 'tensor'); B must divide by data×fsdp.
    config: the loss configuration (static).
    logits_fn: `logits_fn(params, inputs) -> logits [B, T, V]`, e.g. a model's forward pass;
      `inputs` is any pytree of batch-major arrays.

  The parameters keep whatever sharding they arrive with; `inputs` and `batch` are constrained to
  the batch sharding inside the step (place them with `shard_batch` to avoid a copy).
  """
  shards = _check_mesh(mesh)

  def step(params: Params, inputs: Any, batch: LossBatch) -> LossAndGrad:
    _check_batch(inputs, shards, "inputs")
    _check_batch(batch, shards, "batch")
    inputs, batch = jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim)),
        (inputs, batch))

    def loss_sum(p: Params) -> tuple[jax.Array, losses.LossOutput]:
      out = loss_from_logits(logits_fn(p, inputs), batch, config)
      return out.loss_sum, out

    grads, out = jax.grad(loss_sum, has_aux=True)(params)
    return LossAndGrad(output=out, grads=grads)

  return jax.jit(step)
