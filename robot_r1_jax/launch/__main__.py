"""`python -m robot_r1_jax.launch`: train Qwen2.5-VL on Robot-R1 questions with SFT and/or RL.

With no flags it runs the embedded default on this machine: simulated demos → extracted questions →
the tiny model → an SFT warm-up → GRPO → greedy evaluation before and after RL, printed as a table,
with curves in WORKDIR/curves.png, checkpoints and TensorBoard events under ./workdir. `--help`
lists every flag; `--flagfile=robot_r1_jax/launch/configs/robot_r1_paper.cfg` is the paper recipe.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
from absl import app, flags

from robot_r1_jax.data import extract
from robot_r1_jax.data import loader as loader_lib
from robot_r1_jax.launch import flags as F
from robot_r1_jax.launch import mesh as mesh_lib
from robot_r1_jax.launch import pipeline, report
from robot_r1_jax.model.config import ModelConfig
from robot_r1_jax.model.qwen2_5_vl import Qwen25VL
from robot_r1_jax.rl import losses, sampling
from robot_r1_jax.rl.learner import Learner, LearnerConfig
from robot_r1_jax.rl.sampler import Sampler, SamplerConfig
from robot_r1_jax.train import evaluate as eval_lib
from robot_r1_jax.train import loop, sft


@dataclasses.dataclass(frozen=True)
class Run:
  """What every stage shares."""

  mesh: jax.sharding.Mesh
  model: Qwen25VL
  cfg: ModelConfig
  tokenizer: Any  # a transformers tokenizer
  loader_config: loader_lib.LoaderConfig
  data_dir: pathlib.Path
  meta: dict[str, Any]  # the flags, recorded with every checkpoint


def _sampler(run: Run, *, greedy: bool) -> Sampler:
  cfg, tok = run.cfg, run.tokenizer
  params = (sampling.SamplingParams(temperature=0.0) if greedy else sampling.SamplingParams(
      temperature=F.TEMPERATURE.value, top_p=F.TOP_P.value, top_k=F.TOP_K.value))
  stop = tuple(t for t in (cfg.eos_token_id, tok.pad_token_id) if t is not None)
  return Sampler(run.model, SamplerConfig(
      stop_tokens=stop, num_samples=1 if greedy else F.NUM_GENERATIONS.value,
      pad_id=tok.pad_token_id, sampling=params), mesh=run.mesh, tokenizer=tok)


def _evaluator(run: Run, sampler: Sampler) -> Callable[[], eval_lib.EvalResult] | None:
  """Greedy evaluation on the val split, or None (with a warning) when the split is empty."""
  split = extract.Manifest.load(run.data_dir).splits.get("val")
  if split is None or not split.num_records:
    logging.warning("%s has no val questions; evaluation is skipped", run.data_dir)
    return None
  return lambda: _evaluate(run, sampler)


def _evaluate(run: Run, sampler: Sampler) -> eval_lib.EvalResult:
  return eval_lib.evaluate_split(
      sampler, run.data_dir, "val",
      eval_lib.EvalConfig(max_new_tokens=F.MAX_NEW_TOKENS.value,
                          batch_size=F.EVAL_BATCH.value), loader_config=run.loader_config)


def _sft(run: Run, workdir: pathlib.Path) -> None:
  questions = sft.SplitQuestions(run.data_dir, "train")
  data = loader_lib.make_loader(run.data_dir, "train", dataclasses.replace(
      run.loader_config, batch_size=F.SFT_BATCH.value // jax.process_count()))
  optimizer, schedule = pipeline.build_optimizer(
      learning_rate=F.SFT_LEARNING_RATE.value, schedule="cosine", warmup_steps=5,
      total_steps=F.SFT_STEPS.value, weight_decay=F.WEIGHT_DECAY.value,
      grad_clip=F.GRAD_CLIP.value)
  sft.run_sft(run.model, optimizer, iter(data), run.tokenizer, sft.SftConfig(
      total_steps=F.SFT_STEPS.value, targets=questions.target_config(F.SFT_TARGET.value),
      micro_batch_size=F.MICRO_BATCH.value, checkpoint_every=F.CHECKPOINT_EVERY.value,
      keep_checkpoints=F.KEEP_CHECKPOINTS.value, max_consecutive_bad_steps=F.MAX_BAD_STEPS.value,
      meta=run.meta), workdir, run.mesh, questions=questions, lr_schedule=schedule)


def _rl(run: Run, workdir: pathlib.Path, evaluator) -> list[dict[str, float]]:
  g = F.NUM_GENERATIONS.value
  data = loader_lib.make_loader(run.data_dir, "train", dataclasses.replace(
      run.loader_config, batch_size=F.ROLLOUT_BATCH.value // jax.process_count(),
      num_epochs=F.EPOCHS.value))
  total = loop.total_steps(F.MAX_STEPS.value, data.steps_per_epoch, F.EPOCHS.value)
  updates = (F.ROLLOUT_BATCH.value // F.TRAIN_BATCH.value) * F.UPDATES_PER_ROLLOUT.value
  optimizer, schedule = pipeline.build_optimizer(
      learning_rate=F.LEARNING_RATE.value, schedule=F.LR_SCHEDULE.value,
      warmup_steps=F.WARMUP_STEPS.value, total_steps=total * max(updates, 1),
      weight_decay=F.WEIGHT_DECAY.value, grad_clip=F.GRAD_CLIP.value)
  # The reference policy is the model as it is now (after SFT or --init_from).
  learner = Learner(run.model, optimizer, _sampler(run, greedy=False), LearnerConfig(
      algo=F.ALGO.value, num_generations=g, train_batch_size=F.TRAIN_BATCH.value,
      micro_batch_size=F.MICRO_BATCH.value, num_updates_per_rollout=F.UPDATES_PER_ROLLOUT.value,
      max_new_tokens=F.MAX_NEW_TOKENS.value, kl_in_reward=F.KL_IN_REWARD.value,
      reward_kl_estimator=F.KL_ESTIMATOR.value,
      loss=losses.PolicyLossConfig(clip_low=F.CLIP_LOW.value, clip_high=F.CLIP_HIGH.value,
                                   dual_clip=F.DUAL_CLIP.value, kl_coef=F.KL_COEF.value,
                                   kl_estimator=F.KL_ESTIMATOR.value,
                                   aggregation=F.LOSS_AGG.value),
      advantage=dataclasses.replace(LearnerConfig().advantage, kl_coef=F.KL_COEF.value)),
      run.mesh, lr_schedule=schedule)
  base_key = jax.random.key(F.SEED.value)

  def rl_step(batch, step: int) -> loop.StepOutput:
    result = learner.step(batch, jax.random.fold_in(base_key, step))
    return loop.StepOutput(result.metrics, result.rollouts)

  return loop.run(learner, rl_step, iter(data), loop.LoopConfig(
      workdir=workdir, total_steps=total, stage="rl", checkpoint_every=F.CHECKPOINT_EVERY.value,
      keep_checkpoints=F.KEEP_CHECKPOINTS.value, max_consecutive_bad_steps=F.MAX_BAD_STEPS.value,
      log_rollouts_every=F.ROLLOUTS_EVERY.value, eval_every=F.EVAL_EVERY.value,
      progress=(("reward", "reward/total"), ("acc", "accuracy/all"), ("kl", "kl/policy_ref")),
      meta=run.meta), evaluate=evaluator)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  mesh_lib.initialize_distributed(F.COORDINATOR.value, F.NUM_PROCESSES.value, F.PROCESS_ID.value)
  try:  # fail fast, before any data or model work, with what to change
    mesh = mesh_lib.make_mesh(F.MESH.value)
    for flag in (F.ROLLOUT_BATCH, F.SFT_BATCH, F.EVAL_BATCH):
      mesh_lib.batch_rows_per_process(flag.value, mesh)
  except mesh_lib.MeshSpecError as e:
    raise app.UsageError(f"{e} (check --mesh, --rollout_batch_size, --sft_batch_size, "
                         "--eval_batch_size)") from None
  workdir = pathlib.Path(F.WORKDIR.value)
  seed = F.SEED.value

  data_dir = pathlib.Path(F.DATA.value) if F.DATA.value else pipeline.ensure_default_data(
      workdir / "data", tasks=F.SIM_TASKS.value, episodes=F.SIM_EPISODES.value,
      image_size=F.IMAGE_SIZE.value, seed=seed, prompt_style=F.PROMPT_STYLE.value)
  dtype = jnp.bfloat16 if F.COMPUTE_DTYPE.value == "bfloat16" else jnp.float32
  cfg, model, model_dir = pipeline.build_model(F.MODEL.value, dtype=dtype, mesh=mesh, seed=seed,
                                               remat=F.REMAT.value)
  tokenizer, tokenizer_path = pipeline.load_tokenizer(F.TOKENIZER.value, model_dir)
  run = Run(mesh=mesh, model=model, cfg=cfg, tokenizer=tokenizer, data_dir=data_dir,
            loader_config=loader_lib.LoaderConfig(seed=seed, tokenizer_path=tokenizer_path),
            meta={f.name: f.value for f in flags.FLAGS.get_flags_for_module(F.__name__)})
  if F.INIT_FROM.value:
    step = pipeline.restore_params(model, pathlib.Path(F.INIT_FROM.value))
    logging.info("initialised from %s (step %d)", F.INIT_FROM.value, step)
  greedy = _sampler(run, greedy=True)
  logging.info("model=%s mesh=%s data=%s stage=%s mode=%s", F.MODEL.value, dict(mesh.shape),
               data_dir, F.STAGE.value, F.MODE.value)

  evaluator = _evaluator(run, greedy)
  if F.MODE.value == "eval":
    if evaluator is None:
      raise app.UsageError(f"--mode=eval: {data_dir} has no val questions")
    if not F.INIT_FROM.value:
      pipeline.restore_params(model, workdir)
    result = evaluator()
    if jax.process_index() == 0:
      result.write(workdir / "eval.json")
      print(result.table())
    return

  if F.STAGE.value in ("sft_rl", "sft"):
    _sft(run, workdir / "sft" if F.STAGE.value == "sft_rl" else workdir)
  if F.STAGE.value == "sft":
    return
  rl_dir = workdir / "rl" if F.STAGE.value == "sft_rl" else workdir
  before = evaluator() if evaluator and F.STAGE.value == "sft_rl" else None
  history = _rl(run, rl_dir, evaluator)
  if jax.process_index() == 0 and history:
    last = history[-1]
    print(f"done: step {last['step']} reward {last['reward/total']:.3f} "
          f"accuracy {last['accuracy/all']:.3f}; workdir {workdir.resolve()}")
  if before is not None:  # sft_rl with val questions
    after = evaluator()
    if jax.process_index() == 0:
      before.write(workdir / "eval_before_rl.json")
      after.write(workdir / "eval_after_rl.json")
      print(eval_lib.compare_table(before, after, labels=("SFT", f"SFT→{F.ALGO.value.upper()}")))
      print(f"curves: {report.plot_curves(workdir)}")


if __name__ == "__main__":
  flags.adopt_module_key_flags(F)  # --help lists every training flag, not just this module's
  app.run(main)
