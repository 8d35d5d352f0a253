"""`python -m robot_r1_jax.launch`: RL training of Qwen2.5-VL on Robot-R1 questions.

With no flags it runs the embedded default on this machine: simulated demos → extracted questions →
the tiny model → a few GRPO steps → checkpoint → TensorBoard events, all under ./workdir. Every flag
is listed by --help; `--flagfile=robot_r1_jax/launch/configs/robot_r1_paper.cfg` is the paper recipe.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import jax
import jax.numpy as jnp
from absl import app, flags

from robot_r1_jax.data import loader as loader_lib
from robot_r1_jax.launch import flags as F
from robot_r1_jax.launch import mesh as mesh_lib
from robot_r1_jax.launch import pipeline
from robot_r1_jax.rl import losses, rewards, sampling
from robot_r1_jax.rl.learner import Learner, LearnerConfig
from robot_r1_jax.rl.sampler import Sampler, SamplerConfig
from robot_r1_jax.train import loop


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  mesh_lib.initialize_distributed(F.COORDINATOR.value, F.NUM_PROCESSES.value, F.PROCESS_ID.value)
  try:  # fail fast, before any data or model work, with what to change
    mesh = mesh_lib.make_mesh(F.MESH.value)
    mesh_lib.batch_rows_per_process(F.ROLLOUT_BATCH.value, mesh)
  except mesh_lib.MeshSpecError as e:
    raise app.UsageError(str(e)) from None
  workdir = pathlib.Path(F.WORKDIR.value)
  seed = F.SEED.value
  rollout_rows = F.ROLLOUT_BATCH.value * F.NUM_GENERATIONS.value

  data_dir = pathlib.Path(F.DATA.value) if F.DATA.value else pipeline.ensure_default_data(
      workdir / "data", tasks=F.SIM_TASKS.value, episodes=F.SIM_EPISODES.value,
      image_size=F.IMAGE_SIZE.value, seed=seed)
  dtype = jnp.bfloat16 if F.COMPUTE_DTYPE.value == "bfloat16" else jnp.float32
  cfg, model, model_dir = pipeline.build_model(F.MODEL.value, dtype=dtype, mesh=mesh, seed=seed,
                                               remat=F.REMAT.value)
  tokenizer, tokenizer_path = pipeline.load_tokenizer(F.TOKENIZER.value, model_dir)

  loader = loader_lib.make_loader(data_dir, "train", loader_lib.LoaderConfig(
      batch_size=F.ROLLOUT_BATCH.value // jax.process_count(), seed=seed,
      num_epochs=F.EPOCHS.value, tokenizer_path=tokenizer_path))
  total = loop.total_steps(F.MAX_STEPS.value, loader.steps_per_epoch, F.EPOCHS.value)
  updates_per_step = (rollout_rows // (F.TRAIN_BATCH.value * F.NUM_GENERATIONS.value)
                      * F.UPDATES_PER_ROLLOUT.value)
  optimizer, schedule = pipeline.build_optimizer(
      learning_rate=F.LEARNING_RATE.value, schedule=F.LR_SCHEDULE.value,
      warmup_steps=F.WARMUP_STEPS.value, total_steps=total * max(updates_per_step, 1),
      weight_decay=F.WEIGHT_DECAY.value, grad_clip=F.GRAD_CLIP.value)

  stop = tuple(t for t in (cfg.eos_token_id, tokenizer.pad_token_id) if t is not None)
  sampler = Sampler(model, SamplerConfig(
      stop_tokens=stop, num_samples=F.NUM_GENERATIONS.value, pad_id=tokenizer.pad_token_id,
      sampling=sampling.SamplingParams(temperature=F.TEMPERATURE.value, top_p=F.TOP_P.value,
                                       top_k=F.TOP_K.value)), mesh=mesh, tokenizer=tokenizer)
  learner = Learner(model, optimizer, sampler, LearnerConfig(
      algo=F.ALGO.value, num_generations=F.NUM_GENERATIONS.value,
      train_batch_size=F.TRAIN_BATCH.value, micro_batch_size=F.MICRO_BATCH.value,
      num_updates_per_rollout=F.UPDATES_PER_ROLLOUT.value, max_new_tokens=F.MAX_NEW_TOKENS.value,
      kl_in_reward=F.KL_IN_REWARD.value, reward_kl_estimator=F.KL_ESTIMATOR.value,
      loss=losses.PolicyLossConfig(clip_low=F.CLIP_LOW.value, clip_high=F.CLIP_HIGH.value,
                                   dual_clip=F.DUAL_CLIP.value, kl_coef=F.KL_COEF.value,
                                   kl_estimator=F.KL_ESTIMATOR.value,
                                   aggregation=F.LOSS_AGG.value),
      advantage=dataclasses.replace(LearnerConfig().advantage, kl_coef=F.KL_COEF.value),
      reward_weights=rewards.RewardWeights()), mesh, lr_schedule=schedule)

  logging.info("model=%s mesh=%s data=%s steps=%d", F.MODEL.value, dict(mesh.shape), data_dir,
               total)
  base_key = jax.random.key(seed)

  def rl_step(batch, step: int) -> loop.StepOutput:
    result = learner.step(batch, jax.random.fold_in(base_key, step))
    return loop.StepOutput(result.metrics, result.rollouts)

  history = loop.run(learner, rl_step, iter(loader), loop.LoopConfig(
      workdir=workdir, total_steps=total, stage="rl", checkpoint_every=F.CHECKPOINT_EVERY.value,
      keep_checkpoints=F.KEEP_CHECKPOINTS.value, max_consecutive_bad_steps=F.MAX_BAD_STEPS.value,
      log_rollouts_every=F.ROLLOUTS_EVERY.value,
      progress=(("reward", "reward/total"), ("acc", "accuracy/all"), ("kl", "kl/policy_ref")),
      meta={f.name: f.value for f in flags.FLAGS.get_flags_for_module(F.__name__)}))
  if jax.process_index() == 0 and history:
    last = history[-1]
    print(f"done: step {last['step']} reward {last['reward/total']:.3f} "
          f"accuracy {last['accuracy/all']:.3f}; workdir {workdir.resolve()}")


if __name__ == "__main__":
  flags.adopt_module_key_flags(F)  # --help lists every training flag, not just this module's
  app.run(main)
