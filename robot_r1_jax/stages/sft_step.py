"""The compiled SFT update: masked next-token cross-entropy on the target tokens, exact over
micro-batches, AdamW through the run's optimizer, and a non-finite guard.

The loss is built on `train.scoring.sequence_log_probs`, the same scoring pass RL uses (prompt M-RoPE
positions, then one step per completion token), so SFT trains exactly the distribution the sampler
decodes from. Like `rl.losses`, each micro-batch returns unreduced sums (`SftSums`); their total
divided by the total target-token count is the token-mean over the whole batch, whatever the
micro-batch split.

Dimensions (the package alphabet): M micro-batches · B rows per micro-batch · T prompt length ·
R target length (a bucket) · P vision patches per image.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from robot_r1_jax.model import sharding
from robot_r1_jax.model.qwen2_5_vl import Qwen25VL
from robot_r1_jax.train import update
from robot_r1_jax.train.loop import StepResult
from robot_r1_jax.train.scoring import Sequences, sequence_log_probs

# A token counts as right when p(target) > ½: then it is the greedy choice. (Exact greedy accuracy
# needs the logits, which `sequence_log_probs` does not return; this is a lower bound that meets it
# once the model is confident.)
_CONFIDENT_LOGP = math.log(0.5)


@dataclasses.dataclass(frozen=True)
class SftBatch:
  """One host batch for `SftTrainer.step` (built by `sft.SftBatchBuilder`)."""

  seqs: Sequences  # NumPy: prompts [B, T] left-, targets [B, R] right-padded; images [B, P, …]
  image_grid: tuple[int, int, int] | None  # the (t, h, w) every row's image shares


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SftSums:
  """Unreduced sums over the target tokens of one (micro-)batch; sums of parts merge exactly."""

  nll_sum: jax.Array  # f32, Σ −log p(target token)
  confident: jax.Array  # i32, target tokens with p > ½
  tokens: jax.Array  # i32, target tokens (mask 1)

  def merge(self, other: SftSums) -> SftSums:
    return jax.tree.map(jnp.add, self, other)

  @property
  def denominator(self) -> jax.Array:
    """The token count, at least 1: a batch without target tokens has loss 0, never 0/0."""
    return jnp.maximum(self.tokens, 1).astype(jnp.float32)

  @property
  def loss(self) -> jax.Array:
    """Token-mean cross-entropy."""
    return self.nll_sum / self.denominator

  @property
  def token_accuracy(self) -> jax.Array:
    """Fraction of target tokens predicted with p > ½ (see `_CONFIDENT_LOGP`)."""
    return self.confident / self.denominator


def sft_sums(model: Qwen25VL, seqs: Sequences, image_grid: tuple[int, int, int] | None
             ) -> SftSums:
  """Cross-entropy sums of the completion (target) tokens of `seqs` [B, …] under `model`.

  Only completion tokens under `completion_mask` count: prompt positions are conditioning, never
  predicted, and padding is replaced by 0 with `where` before any arithmetic, so whatever it holds
  contributes neither loss nor gradient.
  """
  logp, _ = sequence_log_probs(model, seqs, image_grid)  # [B, R] f32; the entropy is unused
  mask = seqs.completion_mask.astype(bool)
  logp = jnp.where(mask, logp, 0.0)
  return SftSums(nll_sum=-logp.sum(), confident=(mask & (logp > _CONFIDENT_LOGP)).sum(),
                 tokens=mask.sum())


class SftTrainer:
  """Owns the parameters and optimizer state during SFT and the compiled update.

  `train_step(params, opt_state, seqs [M, B, …], image_grid=…)` is jitted once per (prompt
  bucket, target bucket, image grid) with the parameters and optimizer state donated; `step` feeds
  it one host batch.
  """

  def __init__(self, model: Qwen25VL, optimizer: optax.GradientTransformation, mesh: Mesh, *,
               micro_batch_size: int, lr_schedule: optax.Schedule | None = None):
    """Args:
      model: the model to train; `commit` writes the trained parameters back into it.
      optimizer: e.g. `train.optim.build_optimizer` (global-norm clipping, then AdamW).
      mesh: parameters stay where the model put them; micro-batch rows go over (data, fsdp).
      micro_batch_size: rows per forward/backward pass over all processes, as `LearnerConfig`'s;
        each process contributes micro_batch_size / process_count of its batch's rows.
      lr_schedule: the optimizer's schedule, only to log the learning rate.
    """
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if micro_batch_size < 1 or micro_batch_size % shards or micro_batch_size % jax.process_count():
      raise ValueError(f"micro_batch_size={micro_batch_size} must be a positive multiple of the "
                       f"data×fsdp = {shards} devices and of the {jax.process_count()} "
                       "process(es) its rows are split over")
    self.model, self.mesh, self.micro_batch_size = model, mesh, micro_batch_size
    self.optimizer, self.lr_schedule = optimizer, lr_schedule
    self.graphdef, self.params = nnx.split(model, nnx.Param)
    self.opt_state = update.init_opt_state(optimizer, self.params, mesh)
    self.train_step = update.jit_step(self._train_step, self.params, self.opt_state,
                                      ("image_grid",))
    self.bad_steps = 0  # consecutive non-finite updates

  def _train_step(self, params, opt_state, seqs: Sequences, *, image_grid):
    def nll_sum(p, mb: Sequences):
      sums = sft_sums(nnx.merge(self.graphdef, p), mb, image_grid)
      return sums.nll_sum, sums

    params, opt_state, sums, grad_norm, finite = update.accumulate_and_apply(
        self.optimizer, params, opt_state, seqs, nll_sum, lambda s: s.loss)
    metrics = {"loss": sums.loss, "token_accuracy": sums.token_accuracy, "grad_norm": grad_norm,
               "target_tokens": sums.tokens, "finite": finite}
    return params, opt_state, metrics

  def step(self, batch: SftBatch) -> StepResult:
    """One optimizer update on this process's loader batch, in micro-batch shares of its rows."""
    tic = time.perf_counter()
    seqs = batch.seqs
    rows, local = seqs.prompt_ids.shape[0], self.micro_batch_size // jax.process_count()
    if rows % local:
      raise ValueError(f"this process's batch of {rows} rows does not split into micro-batches "
                       f"of {local} rows (micro_batch_size={self.micro_batch_size} over "
                       f"{jax.process_count()} process(es))")
    # [M, B, …] with the rows over (data, fsdp). Global micro-batch m stacks every process's m-th
    # slice of its own rows (any split of the rows gives the same token-mean).
    stacked = jax.tree.map(lambda x: sharding.global_rows(
        x.reshape((-1, local) + x.shape[1:]), self.mesh, leading=1), seqs)
    with sharding.on_mesh(self.mesh):
      self.params, self.opt_state, metrics = self.train_step(
          self.params, self.opt_state, stacked, image_grid=batch.image_grid)
    self.commit()  # the donated arrays the model held are gone; point it at the new ones
    metrics = {k: np.asarray(v).item() for k, v in jax.device_get(metrics).items()}
    seconds = time.perf_counter() - tic
    finite = bool(metrics.pop("finite"))
    self.bad_steps = 0 if finite else self.bad_steps + 1
    real_tokens = int(np.sum(seqs.prompt_mask)) + int(np.sum(seqs.completion_mask))
    out = {**metrics, "skipped_non_finite": float(not finite), "time/step": seconds,
           # Prompt (image tokens included) + target tokens of this process's rows.
           "tokens_per_second": real_tokens / seconds,
           # Executables built so far; growth after the first steps means shapes escape buckets.
           "compiles/sft_step": float(self.train_step._cache_size())}
    if self.lr_schedule is not None:
      # Adam's own count of applied updates: skipped non-finite steps do not advance it.
      out["learning_rate"] = float(self.lr_schedule(update.update_count(self.opt_state)))
    return StepResult(out)

  def commit(self) -> None:
    """Makes `model` hold the current parameters."""
    nnx.update(self.model, self.params)
