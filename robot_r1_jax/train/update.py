"""The optimizer step shared by the SFT and RL stages.

Gradients of a summed loss accumulate exactly over micro-batches (`lax.scan`), are divided by the
summed denominator, and update the parameters through the optimizer unless the loss or the
gradient norm is non-finite. Parameters and optimizer state are donated and keep their placements
from step to step, so one executable serves every step.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class Sums(Protocol):
  """Unreduced per-micro-batch sums (e.g. `rl.losses.LossOutput`, `stages.sft_step.SftSums`)."""

  @property
  def denominator(self) -> jax.Array: ...

  def merge(self, other: Any) -> Any: ...


def init_opt_state(optimizer: optax.GradientTransformation, params: Any, mesh: Mesh) -> Any:
  """`optimizer.init(params)`, each state leaf placed like the parameter it mirrors (Adam's
  moments sharded as the weights are) and the rest (Adam's count) replicated on the mesh.

  Left to XLA, the fresh zeros of the moments come out unsharded (a full copy per device, twice
  the model's f32 size); here they are placed explicitly. Abstract `params` (ShapeDtypeStructs
  with shardings) give the abstract state, for compiling without arrays.
  """
  abstract = jax.eval_shape(optimizer.init, params)
  shardings = optax.tree_utils.tree_map_params(
      optimizer, lambda _, p: p.sharding, abstract, params,
      transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()))
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings)
  return jax.jit(optimizer.init, out_shardings=shardings)(params)


def jit_step(step: Callable, params: Any, opt_state: Any,
             static_argnames: Sequence[str] = ()) -> Callable:
  """Jits `step(params, opt_state, …) -> (params, opt_state, metrics)` with both donated and the
  outputs pinned to the inputs' placements (so step 2 reuses step 1's executable)."""
  placement = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  return jax.jit(step, donate_argnums=(0, 1), static_argnames=tuple(static_argnames),
                 out_shardings=(placement(params), placement(opt_state), None))


def accumulate_and_apply(optimizer: optax.GradientTransformation, params: Any, opt_state: Any,
                         micro_batches: Any, loss_sums: Callable[[Any, Any], tuple[jax.Array, Sums]],
                         loss_of: Callable[[Sums], jax.Array]
                         ) -> tuple[Any, Any, Sums, jax.Array, jax.Array]:
  """One guarded update from micro-batches stacked on a leading M axis.

  `loss_sums(params, micro_batch) -> (loss sum, sums)`; the gradient applied is that of
  Σ loss sum / Σ denominator, exactly the full batch's; `loss_of(sums)` is the batch loss. Returns
  (params, opt_state, the merged sums, the gradient norm, whether the loss and the gradient norm
  were finite); a non-finite step returns the input parameters and optimizer state.
  """
  grads_of = lambda mb: jax.grad(loss_sums, has_aux=True)(params, mb)

  def micro(carry, mb):
    grads_acc, sums_acc = carry
    grads, sums = grads_of(mb)
    return (jax.tree.map(jnp.add, grads_acc, grads), sums_acc.merge(sums)), None

  first = grads_of(jax.tree.map(lambda x: x[0], micro_batches))
  (grads, sums), _ = jax.lax.scan(micro, first, jax.tree.map(lambda x: x[1:], micro_batches))
  scale = 1.0 / jnp.maximum(sums.denominator, 1).astype(jnp.float32)
  grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss_of(sums)) & jnp.isfinite(grad_norm)
  updates, new_opt = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  return keep(new_params, params), keep(new_opt, opt_state), sums, grad_norm, finite


def update_count(opt_state: Any) -> jax.Array:
  """Updates applied so far (the schedule's step), as Adam's state counts them: skipped
  non-finite steps do not advance it."""
  return optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1]
