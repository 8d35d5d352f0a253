"""The one jitted update: on the real RL loss, sharded over 8 fake CPU devices, it equals one
device; the optimizer state it carries is placed like the parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from robot_r1_jax.generate import sampling
from robot_r1_jax.model import config as config_lib
from robot_r1_jax.model.qwen2_5_vl import init_model
from robot_r1_jax.rl import kl, losses
from robot_r1_jax.stages.rl_step import Learner, LearnerConfig, TrainRows
from robot_r1_jax.train import update
from robot_r1_jax.train.optim import OptimizerConfig, build_optimizer
from robot_r1_jax.train.scoring import Sequences

from testing import image_prompts, make_sampler

G, PROMPTS, R = 4, 2, 7
# Per-sequence means, the k3 KL term in the loss and dual clipping all take part.
CONFIG = LearnerConfig(num_generations=G, train_batch_size=PROMPTS, micro_batch_size=4,
                       kl=kl.KLPenalty(coef=0.1, estimator="k3"),
                       loss=losses.PolicyLossConfig(aggregation="seq_mean_token_mean"))


def _rows(tokenizer) -> tuple[TrainRows, tuple[int, int, int]]:
  """G ragged completions of each of two image prompts, with old/reference log-probs and
  advantages far enough from the policy's that both clips and the KL term are active."""
  rng = np.random.default_rng(0)
  prompts = image_prompts(tokenizer, [(text, rng.integers(0, 256, (56, 56, 3), dtype=np.uint8))
                                      for text in ("Which way?", "Where next, and why?")],
                          pad_id=tokenizer.pad_token_id)
  rows = PROMPTS * G
  lengths = rng.integers(1, R + 1, rows)
  mask = (np.arange(R)[None] < lengths[:, None]).astype(np.int32)
  pixels = np.stack(prompts.pixels)
  seqs = Sequences(prompt_ids=np.repeat(prompts.ids, G, 0).astype(np.int32),
                   prompt_mask=np.repeat(prompts.mask, G, 0).astype(np.int32),
                   completion=rng.integers(0, 1000, (rows, R)).astype(np.int32),
                   completion_mask=mask, pixel_values=np.repeat(pixels, G, 0))
  logp = lambda scale: (np.log(1 / 1031) + scale * rng.normal(size=(rows, R))).astype(np.float32)
  advantages = np.repeat(rng.normal(size=(rows, 1)), R, 1).astype(np.float32) * mask
  return TrainRows(seqs=seqs, old_logp=logp(2.0), ref_logp=logp(1.0), advantages=advantages,
                   rollout_logp=logp(0.5)), prompts.grids[0]


# An "optimizer" that leaves the parameters and keeps the gradient it was given as its state.
_KEEP_GRADIENT = optax.GradientTransformation(
    init=lambda params: jax.tree.map(jnp.zeros_like, params),
    update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _update(mesh, tokenizer, rows: TrainRows, grid) -> tuple[dict[str, float], list, str]:
  """The RL update of a fresh tiny model on `mesh`: (metrics, the gradient applied, the compiled
  step's HLO)."""
  model = init_model(config_lib.tiny(), seed=0, mesh=mesh)
  sampler = make_sampler(model, tokenizer, mesh=mesh, num_samples=G,
                         sampling=sampling.SamplingParams())
  learner = Learner(model, _KEEP_GRADIENT, sampler, CONFIG, mesh)
  placed = jax.tree.map(jnp.asarray, rows)
  hlo = learner.train_step.lower(
      learner.params, learner.opt_state, learner._select(placed, jnp.arange(PROMPTS * G)),
      image_grid=grid, on_policy=False).compile().as_text()
  metrics = learner._update(placed, jax.random.key(0), grid, on_policy=False)
  return metrics, [np.asarray(g) for g in jax.tree.leaves(learner.opt_state)], hlo


def test_sharded_rl_update_equals_single_device(tokenizer, one_device_mesh, mesh8):
  rows, grid = _rows(tokenizer)
  want, want_grads, _ = _update(one_device_mesh, tokenizer, rows, grid)
  assert want["update/clip_fraction"] > 0 and want["update/dual_clip_fraction"] > 0
  assert want["update/kl_loss"] > 0 and want["updates/skipped_non_finite"] == 0
  got, got_grads, hlo = _update(mesh8, tokenizer, rows, grid)
  # Summation order differs across devices (~1e-6 relative in f32).
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  assert want["update/grad_norm"] > 0
  for sharded, single in zip(got_grads, want_grads):
    scale = float(np.abs(single).max())
    np.testing.assert_allclose(sharded, single, rtol=1e-4, atol=1e-5 * scale)
  # The rows really are split: the compiled step reduces across devices.
  assert "all-reduce" in hlo or "reduce-scatter" in hlo


def test_optimizer_state_is_placed_like_the_parameters(mesh8):
  """Adam's moments shard as their weights do (left to XLA they came out whole on every device),
  the count is replicated, and abstract parameters give the abstract state."""
  model = init_model(config_lib.tiny(), seed=0, mesh=mesh8)
  params = nnx.state(model, nnx.Param)
  optimizer, _ = build_optimizer(OptimizerConfig(), total_steps=1)
  state = update.init_opt_state(optimizer, params, mesh8)
  same = optax.tree_utils.tree_map_params(
      optimizer, lambda moment, p: moment.sharding.is_equivalent_to(p.sharding, p.ndim), state,
      params, transform_non_params=lambda x: x.sharding.is_fully_replicated)
  assert all(jax.tree.leaves(same))
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          params)
  structs = update.init_opt_state(optimizer, abstract, mesh8)
  for struct, array in zip(jax.tree.leaves(structs), jax.tree.leaves(state)):
    assert isinstance(struct, jax.ShapeDtypeStruct) and struct.shape == array.shape
    assert struct.sharding.is_equivalent_to(array.sharding, array.ndim)
