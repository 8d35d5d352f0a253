"""One RL step: rollout → rewards → reference/old log-probs → advantages → μ passes of updates.

The pieces that touch parameters are jitted once per shape: `sequence_log_probs` (old and
reference log-probs) and `train_step` (micro-batch gradient accumulation with `lax.scan`, clipping,
AdamW, non-finite guard), with the parameters and optimizer state donated. Completions are cut to
the rollout's longest at a few widths per new-token bucket (`LearnerConfig.width_steps`), each
prompt (with its image) is run once for its G samples, whose completions attend to its keys and
values (`LearnerConfig.prompt_share`), and those completions are packed into their real tokens
(`LearnerConfig.pack_steps`): the update pays for what was generated. The host only moves batches
and turns completions into rewards.

Dimensions (the package alphabet): B prompts · G samples per prompt · M micro-batches · T prompt
bucket · R completion width.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from robot_r1_jax.data.prompts import QUESTION_TYPES
from robot_r1_jax.generate.sampler import FinishReason, Sampler, SamplerOutput
from robot_r1_jax.model import layers, sharding
from robot_r1_jax.model.qwen2_5_vl import Qwen25VL
from robot_r1_jax.rl import advantages as adv_lib
from robot_r1_jax.rl import kl as kl_lib
from robot_r1_jax.rl import losses, rewards, shaping
from robot_r1_jax.stages import dynamic_sampling
from robot_r1_jax.train import update
from robot_r1_jax.train.loop import StepResult
from robot_r1_jax.train.metrics import StepTimer
from robot_r1_jax.train.scoring import Sequences, packed_rows_for, sequence_log_probs


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
  """How a rollout becomes updates. Batch sizes count prompts unless they say sequences."""

  algo: str = "grpo"
  num_generations: int = 5  # G
  train_batch_size: int = 128  # prompts per optimizer update (a mini-batch of G·this sequences)
  micro_batch_size: int = 8  # sequences per forward/backward; gradients accumulate exactly
  num_updates_per_rollout: int = 1  # μ passes over the rollout's mini-batches
  max_new_tokens: int = 256
  # Completions are cut to the rollout's longest, rounded up to k/width_steps of the new-token
  # bucket R: the update pays for the tokens generated, not the budget, at ≤ width_steps compiled
  # widths per bucket (32-token steps for R = 256).
  width_steps: int = 8
  # Score each micro-batch's completions packed into their real tokens (`scoring.packed_rows_for`):
  # the update and the old/reference log-probs cost the tokens generated, not the longest
  # completion's width in every row, at ≤ pack_steps more compiled shapes per width. 0: never.
  pack_steps: int = 4
  # The KL to the reference: a term of the loss (the paper's k3, β 1e-2) and/or a penalty taken
  # from the reward (REINFORCE++'s k1), each with its own β and estimator as verl allows.
  kl: kl_lib.KLPenalty = kl_lib.KLPenalty()
  kl_reward: kl_lib.KLPenalty = kl_lib.KLPenalty(coef=0.0, estimator="k1", placement="reward")
  # Keep the frozen reference in host memory (pinned_host) between its scoring passes: the
  # accelerator holds it only while the reference log-probs run, and each step copies it in once
  # (verl's ref param offload). At 7B on 16 chips: 0.97 GiB of HBM per chip freed during the
  # rollout and the update, for a copy of that 0.97 GiB into each chip once a step.
  offload_reference: bool = False
  loss: losses.PolicyLossConfig = losses.PolicyLossConfig()
  advantage: adv_lib.AdvantageOptions = adv_lib.AdvantageOptions()
  reward_weights: rewards.RewardWeights = rewards.RewardWeights()
  # Shapers applied to each completion's score, in order (`shaping.REWARD_SHAPERS`).
  reward_shapers: tuple[str, ...] = ()
  shaping: shaping.ShapingOptions = shaping.ShapingOptions()
  # A `shaping.BATCH_FILTERS` name: draw prompts until the rollout is full of groups it keeps,
  # at most `max_draws` loader batches per step (DAPO's dynamic sampling). None: every group.
  batch_filter: str | None = None
  max_draws: int = 10
  mask_truncated: bool = False  # no loss on completions cut by the budget (DAPO's overlong filter)

  def __post_init__(self):
    adv_lib.get_estimator(self.algo)  # raises naming the valid estimators
    shaping.check_names(shaping.REWARD_SHAPERS, "reward shaper", self.reward_shapers)
    if self.batch_filter is not None:
      shaping.check_names(shaping.BATCH_FILTERS, "batch filter", (self.batch_filter,))
    if "overlong" in self.reward_shapers and not 0 < self.shaping.overlong_buffer <= (
        self.max_new_tokens):
      raise ValueError(f"the 'overlong' reward shaper needs 0 < overlong_buffer <= max_new_tokens "
                       f"({self.max_new_tokens}); got {self.shaping.overlong_buffer}")
    if self.max_draws < 1:
      raise ValueError(f"max_draws={self.max_draws} must be >= 1")
    if self.kl.placement != "loss" or self.kl_reward.placement != "reward":
      raise ValueError(f"LearnerConfig.kl goes in the loss and kl_reward in the reward; got "
                       f"placements {self.kl.placement!r} and {self.kl_reward.placement!r}")
    if self.width_steps < 1:
      raise ValueError(f"width_steps={self.width_steps} must be >= 1")
    if self.pack_steps < 0:
      raise ValueError(f"pack_steps={self.pack_steps} must be >= 0 (0: never packed)")
    rows = self.train_batch_size * self.num_generations
    if rows % self.micro_batch_size:
      raise ValueError(f"train_batch_size × num_generations = {rows} sequences is not a multiple "
                       f"of micro_batch_size={self.micro_batch_size}")

  @property
  def needs_reference(self) -> bool:
    """Whether either KL term is on, so that the reference policy is kept and scored."""
    return self.kl.active or self.kl_reward.active

  @property
  def prompt_share(self) -> int:
    """Adjacent rows of a micro-batch that hold one prompt, scored with one prompt pass.

    Rows keep the sampler's order (row b·G + g is sample g of prompt b) and updates shuffle whole
    groups, so every aligned run of gcd(micro_batch_size, G) rows shares its prompt.
    """
    return math.gcd(self.micro_batch_size, self.num_generations)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainRows:
  """What one optimizer update consumes, stacked as [M micro-batches, rows, …]."""

  seqs: Sequences
  old_logp: jax.Array  # [M, B·G/M, R] f32 (unused when on-policy)
  ref_logp: jax.Array  # [M, B·G/M, R] f32 (zeros without a KL term)
  advantages: jax.Array  # [M, B·G/M, R] f32
  rollout_logp: jax.Array  # [M, B·G/M, R] f32 the sampler's (used by truncated importance sampling)


class Learner:
  """Owns the policy parameters, the frozen reference, the optimizer and the compiled steps."""

  def __init__(self, model: Qwen25VL, optimizer: optax.GradientTransformation,
               sampler: Sampler, config: LearnerConfig, mesh: Mesh,
               lr_schedule: optax.Schedule | None = None, reward_fn: RewardFn | None = None):
    self.model, self.sampler, self.config, self.mesh = model, sampler, config, mesh
    self.lr_schedule = lr_schedule
    drawn = sampler.config.sampling
    self.temperature = 1.0 if drawn.greedy else drawn.temperature
    self.reward_fn = reward_fn or (
        lambda texts, answers: rewards.compute_rewards(texts, answers, config.reward_weights))
    self.graphdef, params = nnx.split(model, nnx.Param)
    self.optimizer = optimizer
    self.params = params
    self.opt_state = update.init_opt_state(optimizer, params, mesh)
    self.ref_params = (_reference(params, model.dtype, config.offload_reference)
                       if config.needs_reference else None)
    self.log_probs_step = jax.jit(self._log_probs_impl,
                                  static_argnames=("image_grid", "packed_rows"))
    self._select = jax.jit(self._select_impl)
    self.train_step = update.jit_step(self._train_step_impl, params, self.opt_state,
                                       ("image_grid", "on_policy", "packed_rows"))
    self.bad_steps = 0
    if config.prompt_share < config.num_generations:
      logging.info("micro_batch_size=%d holds runs of %d samples of a prompt (G=%d): each prompt is "
                   "scored %d times per pass; a multiple of G scores it once",
                   config.micro_batch_size, config.prompt_share, config.num_generations,
                   config.num_generations // config.prompt_share)

  # ---------------------------------------------------------------------------- compiled pieces

  def _model(self, params) -> Qwen25VL:
    return nnx.merge(self.graphdef, params)

  def _log_probs_impl(self, params, seqs: Sequences, image_grid, packed_rows=None):
    return sequence_log_probs(self._model(params), seqs, image_grid, self.temperature,
                              self.config.prompt_share, packed_rows=packed_rows)[0]

  def _train_step_impl(self, params, opt_state, rows: TrainRows, *, image_grid, on_policy: bool,
                       packed_rows: int | None = None):
    cfg = self.config
    kl = cfg.kl if cfg.kl.active else None

    def loss_sum(p, mb: TrainRows):
      logp, entropy = sequence_log_probs(self._model(p), mb.seqs, image_grid, self.temperature,
                                         cfg.prompt_share, entropy_grad=cfg.loss.entropy_coef > 0,
                                         packed_rows=packed_rows)
      old = jax.lax.stop_gradient(logp) if on_policy else mb.old_logp
      out = losses.policy_loss(
          logp, old, mb.advantages, mb.seqs.completion_mask, cfg.loss,
          ref_logp=mb.ref_logp if kl else None, entropy=entropy, kl=kl,
          rollout_logp=mb.rollout_logp if cfg.loss.tis_cap is not None else None)
      return out.loss_sum, out

    params, opt_state, out, grad_norm, finite = update.accumulate_and_apply(
        self.optimizer, params, opt_state, rows, loss_sum, losses.finalize)
    metrics = {**losses.loss_metrics(out), "grad_norm": grad_norm, "finite": finite}
    return params, opt_state, metrics

  # ------------------------------------------------------------------------------- host side

  def reference(self) -> Any:
    """The reference parameters in accelerator memory, placed like the policy's: a copy in from
    the host when `offload_reference` (freed when the caller drops it), else the reference itself.
    Abstract references (compiling without arrays) give the abstract placement."""
    if not self.config.offload_reference:
      return self.ref_params
    return jax.tree.map(lambda r, p: _placed(r, p.sharding), self.ref_params, self.params)

  def log_probs(self, params, seqs: Sequences, image_grid) -> jax.Array:
    """Log-probs [B·G, R] computed micro-batch by micro-batch (bounded activation memory)."""
    mb = self.config.micro_batch_size
    rows = seqs.prompt_ids.shape[0]
    packed_rows = self._packed_rows(seqs.completion_mask.reshape(rows // mb, mb, -1))
    with sharding.on_mesh(self.mesh):
      parts = [self.log_probs_step(params, jax.tree.map(lambda x: x[i:i + mb], seqs),
                                   image_grid=image_grid, packed_rows=packed_rows)
               for i in range(0, rows, mb)]
    return jnp.concatenate(parts, axis=0)

  def _packed_rows(self, completion_mask: jax.Array) -> int | None:
    """`packed_rows` for every micro-batch of `completion_mask` [M, rows, R] (None: padded)."""
    cfg = self.config
    if cfg.pack_steps == 0:
      return None
    shards = sharding.batch_shards(completion_mask.shape[1], self.mesh)
    return packed_rows_for(completion_mask, shards, cfg.pack_steps)

  def step(self, batch: Any, key: jax.Array, draw: Callable[[], Any] | None = None) -> StepResult:
    """One RL step on this process's loader batch (prompts with `input_ids`, `attention_mask`,
    `pixel_values`, `image_grid_thw`, `answers`, `question_types`).

    With a `batch_filter`, `draw()` gives the next loader batch (StopIteration when the data ends)
    and the step draws until the rollout is full of kept groups (`dynamic_sampling`).
    Arrays that cross processes are global (rows split over data×fsdp); text, rewards and the
    returned `StepResult` arrays are this process's rows. Metrics are over all processes.
    """
    cfg, g = self.config, self.config.num_generations
    timer = StepTimer()
    rollout = self._rollout(batch, jax.random.fold_in(key, 0), timer)
    sampling_metrics = {}
    if cfg.batch_filter is not None:  # DAPO: draw until the rollout is full of kept groups
      rollout, sampling_metrics = self._fill(rollout, jax.random.fold_in(key, 0), draw, timer)
    batch, out, reward = rollout.batch, rollout.out, rollout.reward
    grids = np.asarray(batch.image_grid_thw) if batch.pixel_values is not None else None
    image_grid = None if grids is None else _single_grid(grids)
    answers = np.repeat(np.asarray(batch.answers), g)
    types = np.repeat(np.asarray(batch.question_types), g)

    with timer("advantage"):  # reference / old log-probs, then the estimator
      rows, kl, on_policy = self._score(batch, out, reward, image_grid)

    with timer("update"):  # μ passes of mini-batch updates over micro-batch gradients
      update_metrics = self._update(rows, key, image_grid, on_policy)

    self.bad_steps = self.bad_steps + 1 if update_metrics["updates/skipped_non_finite"] else 0
    metrics = {**_all_processes_summary(reward, types),
               **_rollout_metrics(rows, kl, out),
               **sampling_metrics,
               **update_metrics,
               **({"update/learning_rate": float(self.lr_schedule(
                   update.update_count(self.opt_state)))} if self.lr_schedule else {}),
               **timer.summary(),
               **self._compile_counts()}
    advantages = np.asarray(sharding.local_rows(rows.advantages))
    completion_mask = np.asarray(sharding.local_rows(rows.seqs.completion_mask))
    # A sequence's advantage: its tokens' mean (one value per sequence for GRPO and RLOO).
    seq_advantage = ((advantages * completion_mask).sum(-1)
                     / np.maximum(completion_mask.sum(-1), 1))
    records = [dict(record_index=int(i), task=str(task), sample=k % g, question_type=str(q),
                    answer=str(a), completion=t, reward=float(r), format_reward=float(f),
                    answer_reward=float(ar + xr), advantage=float(adv))
               for k, (i, task, q, a, t, r, f, ar, xr, adv) in enumerate(zip(
                   np.repeat(np.asarray(batch.record_indices), g),
                   np.repeat(np.asarray(batch.tasks), g), types, answers, out.text, reward.total,
                   reward.format, reward.answer, reward.xyz, seq_advantage))]
    return StepResult(metrics=metrics, rollouts=records, scores=np.asarray(reward.total),
                      advantages=advantages, completion_mask=completion_mask)

  def _rollout(self, batch: Any, key: jax.Array, timer: StepTimer) -> dynamic_sampling.Rollout:
    """G completions per prompt of `batch` and their rewards, shaped."""
    cfg, g = self.config, self.config.num_generations
    grids = np.asarray(batch.image_grid_thw) if batch.pixel_values is not None else None
    with timer("rollout"):  # G completions per prompt from one prefill
      out = self.sampler(batch.input_ids, batch.attention_mask, key,
                         max_new_tokens=cfg.max_new_tokens, pixel_values=batch.pixel_values,
                         image_grid_thw=grids)
    with timer("reward"):  # rule-based, on this process's detokenised completions
      answers = np.repeat(np.asarray(batch.answers), g)
      reward = self.reward_fn(list(out.text), [str(a) for a in answers])
      if cfg.reward_shapers:
        lengths = sharding.local_rows(out.lengths)
        truncated = sharding.local_rows(out.finish_reasons) == FinishReason.LENGTH
        total = reward.total
        for name in cfg.reward_shapers:
          total = shaping.REWARD_SHAPERS[name](total, lengths, truncated, cfg.max_new_tokens,
                                               cfg.shaping)
        reward = dataclasses.replace(reward, total=np.asarray(total, np.float32))
    return dynamic_sampling.Rollout(batch=batch, out=out, reward=reward)

  def _fill(self, first: dynamic_sampling.Rollout, key: jax.Array,
            draw: Callable[[], Any] | None, timer: StepTimer
            ) -> tuple[dynamic_sampling.Rollout, dict[str, float]]:
    """`dynamic_sampling.fill` with this learner's filter; draw d samples with fold_in(key, d)."""
    cfg, g = self.config, self.config.num_generations
    keep = lambda r: shaping.BATCH_FILTERS[cfg.batch_filter](r.reward.total.reshape(-1, g))

    def more(d: int) -> dynamic_sampling.Rollout | None:
      try:
        extra = None if draw is None else draw()
      except StopIteration:
        return None
      return None if extra is None else self._rollout(extra, jax.random.fold_in(key, d), timer)

    return dynamic_sampling.fill(first, keep, more, cfg.max_draws, g, self.mesh)

  def _score(self, batch: Any, out: SamplerOutput, reward: rewards.RewardOutput, image_grid
             ) -> tuple[TrainRows, jax.Array | None, bool]:
    """The rollout's rows with their reference/old log-probs and advantages, the per-token KL
    [B·G, R] to the reference (by the loss term's estimator, for the metrics; None without a
    reference), and whether the rollout feeds a single on-policy update."""
    cfg, g = self.config, self.config.num_generations
    seqs, sampled_logp = self._sequences(batch, out)
    total = seqs.completion.shape[0]
    per_update = cfg.train_batch_size * g
    if total % per_update:
      raise ValueError(f"a rollout of {total} sequences does not split into updates of "
                       f"train_batch_size × G = {per_update}")
    on_policy = total // per_update * cfg.num_updates_per_rollout == 1
    zeros = jnp.zeros(seqs.completion.shape, jnp.float32)
    ref_logp = (self.log_probs(self.reference(), seqs, image_grid) if cfg.needs_reference
                else zeros)
    old_logp = zeros if on_policy else self.log_probs(self.params, seqs, image_grid)
    behaviour = sampled_logp if on_policy else old_logp
    kl = None
    if cfg.needs_reference:  # without one, ref_logp is a placeholder of zeros
      kl = kl_lib.kl_divergence(behaviour, ref_logp, cfg.kl.estimator) * seqs.completion_mask
    penalty = None
    if cfg.kl_reward.active:
      penalty = cfg.kl_reward.coef * kl_lib.kl_divergence(behaviour, ref_logp,
                                                          cfg.kl_reward.estimator)
    scores = sharding.global_rows(np.asarray(reward.total, np.float32), self.mesh)
    advantages = adv_lib.get_estimator(cfg.algo)(
        scores, seqs.completion_mask, g, penalty, options=cfg.advantage)
    # Dispatch is asynchronous: wait here so the phase times are the phases' own.
    jax.block_until_ready((ref_logp, old_logp, advantages))
    rows = TrainRows(seqs=seqs, old_logp=old_logp, ref_logp=ref_logp, advantages=advantages,
                     rollout_logp=sampled_logp.astype(jnp.float32))
    return rows, kl, on_policy

  def _compile_counts(self) -> dict[str, float]:
    """Executables built so far; growth after the first steps means shapes escape the buckets."""
    return {"compiles/train_step": float(self.train_step._cache_size()),
            "compiles/log_probs": float(self.log_probs_step._cache_size()),
            **{f"compiles/sampler_{k}": float(v) for k, v in self.sampler.traces.counts.items()}}

  def _sequences(self, batch: Any, out: SamplerOutput) -> tuple[Sequences, jax.Array]:
    """Prompt + completion rows (global), each with its prompt's image repeated G times, and the
    sampling log-probs, with completions cut to the longest (see `completion_width`)."""
    pixels = None
    if batch.pixel_values is not None:
      pv = np.asarray(batch.pixel_values, np.float32)
      pv = np.repeat(pv.reshape(len(batch.input_ids), -1, pv.shape[-1]),
                     self.config.num_generations, axis=0)
      pixels = sharding.global_rows(pv, self.mesh)
    width = completion_width(out.lengths, out.tokens.shape[1], self.config.width_steps)
    as_int = lambda x: x[:, :width].astype(jnp.int32)
    mask = out.mask
    if self.config.mask_truncated:  # no loss on completions the budget cut (DAPO)
      mask = mask & (out.finish_reasons != FinishReason.LENGTH)[:, None]
    seqs = Sequences(prompt_ids=out.prompt_tokens.astype(jnp.int32),
                     prompt_mask=out.prompt_mask.astype(jnp.int32),
                     completion=as_int(out.tokens), completion_mask=as_int(mask),
                     pixel_values=pixels)
    return seqs, out.log_probs[:, :width]

  def _update(self, rows: TrainRows, key: jax.Array, image_grid, on_policy: bool
              ) -> dict[str, float]:
    """μ passes over shuffled mini-batches; returns the mean update metrics."""
    cfg, g = self.config, self.config.num_generations
    total = rows.seqs.completion.shape[0]
    per_update = cfg.train_batch_size * g
    # Every process draws the same permutation (same key), so the global gather agrees.
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    step_metrics = []
    for _ in range(cfg.num_updates_per_rollout):
      # Whole groups, each in sample order: micro-batches keep runs of one prompt (prompt_share).
      order = (rng.permutation(total // g)[:, None] * g + np.arange(g)).ravel()
      for start in range(0, total, per_update):
        with sharding.on_mesh(self.mesh):
          mb = self._select(rows, jnp.asarray(order[start:start + per_update]))
          self.params, self.opt_state, m = self.train_step(
              self.params, self.opt_state, mb, image_grid=image_grid, on_policy=on_policy,
              packed_rows=self._packed_rows(mb.seqs.completion_mask))
        step_metrics.append(m)
    self.commit()
    jax.block_until_ready(self.params)
    out = {f"update/{k}": float(np.mean([float(m[k]) for m in step_metrics]))
           for k in step_metrics[0] if k != "finite"}
    out["updates/skipped_non_finite"] = float(sum(1 - int(m["finite"]) for m in step_metrics))
    return out

  def _select_impl(self, rows: TrainRows, idx: jax.Array) -> TrainRows:
    micro = self.config.micro_batch_size
    stacked = jax.tree.map(lambda x: x[idx].reshape((-1, micro) + x.shape[1:]), rows)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
        x, micro_batch_sharding(self.mesh, x.ndim)), stacked)

  def commit(self) -> None:
    """Makes the model (and hence the sampler) see the current parameters."""
    nnx.update(self.model, self.params)


RewardFn = Callable[[list[str], list[str]], rewards.RewardOutput]


def _reference(params: Any, dtype: jnp.dtype, offload: bool = False) -> Any:
  """The frozen reference policy: the initial parameters in the compute dtype, placed like them
  (in the host's pinned memory with `offload`, sharded the same way).

  The model casts every parameter to the compute dtype where it is used, so a reference stored in
  that dtype scores exactly as the f32 one would, at half the memory under bf16. The copy is a new
  buffer (a jit output), so donating the trained parameters never frees it. Abstract parameters
  (compiling without arrays) give the abstract reference.
  """
  where = lambda s: s.with_memory_kind("pinned_host") if offload else s
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
    return jax.tree.map(lambda r, p: _placed(r, where(p.sharding)),
                        layers.cast_floating(params, dtype), params)
  placement = jax.tree.map(lambda x: where(x.sharding), params)
  return jax.jit(functools.partial(layers.cast_floating, dtype=dtype),
                 out_shardings=placement)(params)


def _placed(x: Any, sharding: jax.sharding.Sharding) -> Any:
  """`x` (an array or an abstract one) with `sharding`: a transfer for arrays."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.device_put(x, sharding)


def _rollout_metrics(rows: TrainRows, kl: jax.Array | None, out: SamplerOutput
                     ) -> dict[str, float]:
  """KL to the reference (when there is one), response lengths and advantage statistics over the
  valid tokens."""
  mask = rows.seqs.completion_mask.astype(bool)
  tokens = jnp.maximum(mask.sum(), 1)
  adv_mean = jnp.sum(jnp.where(mask, rows.advantages, 0.0)) / tokens
  adv_var = jnp.sum(jnp.where(mask, (rows.advantages - adv_mean)**2, 0.0)) / tokens
  return {**({} if kl is None else {"kl/policy_ref": float(kl.sum() / tokens)}),
          "response_length/mean": float(out.lengths.mean()),
          "response_length/clipped_fraction": float(jnp.mean(
              out.finish_reasons == FinishReason.LENGTH)),
          "advantage/mean": float(adv_mean),
          "advantage/std": float(jnp.sqrt(adv_var)),
          "tokens/generated": float(out.lengths.sum()),
          "tokens/trained": float(mask.sum())}


def completion_width(lengths: jax.Array, bucket: int, steps: int) -> int:
  """The longest of `lengths` rounded up to a multiple of ⌈bucket / steps⌉, at most `bucket`."""
  unit = -(-bucket // steps)
  longest = max(int(jnp.max(lengths)), 1)
  return min(-(-longest // unit) * unit, bucket)


def _single_grid(grids: np.ndarray) -> tuple[int, int, int]:
  """The one image grid shared by every prompt (the loader resizes images to one size)."""
  unique = {tuple(int(v) for v in g) for g in np.asarray(grids).reshape(-1, 3)}
  if len(unique) != 1:
    raise ValueError(f"a batch mixes image grids {sorted(unique)}; extract with one --image_size")
  return unique.pop()


def _all_processes_summary(reward: rewards.RewardOutput, types: np.ndarray) -> dict[str, float]:
  """Reward means and accuracy by question type over every process's completions."""
  codes = np.array([QUESTION_TYPES.index(t) if t in QUESTION_TYPES else -1 for t in types])
  local = np.stack([reward.total, reward.format, reward.answer, codes]).astype(np.float32)
  if jax.process_count() > 1:
    local = np.asarray(multihost_utils.process_allgather(local.T, tiled=True)).T
  total, fmt, answer, codes = local
  out = {"reward/total": float(total.mean()), "reward/format": float(fmt.mean()),
         "accuracy/all": float(answer.mean())}
  for code, name in enumerate(QUESTION_TYPES):
    if (codes == code).any():
      out[f"accuracy/{name}"] = float(answer[codes == code].mean())
  return out


def micro_batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """[M, R, …] stacks: the micro-batch rows R over (data, fsdp)."""
  return NamedSharding(mesh, PartitionSpec(None, sharding.logical_to_spec(("batch",))[0],
                                           *([None] * (ndim - 2))))
