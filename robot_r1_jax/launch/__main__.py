"""`python -m robot_r1_jax.launch`: train Qwen2.5-VL on Robot-R1 questions with SFT and/or RL.

With no flags it runs the embedded default on this machine: simulated demos → extracted questions →
the tiny model → an SFT warm-up → GRPO → greedy evaluation before and after RL, printed as a table,
with curves in WORKDIR/curves.png, checkpoints and TensorBoard events under ./workdir. `--help`
lists every flag; `--flagfile=robot_r1_paper.cfg` is the paper recipe (flagfiles are found beside
the including file, then among the packaged `configs/`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Callable

import jax
from absl import app, flags

from robot_r1_jax.data import atomic
from robot_r1_jax.data.demo import DemoError
from robot_r1_jax.data import records
from robot_r1_jax.data.loader import LoaderConfig
from robot_r1_jax.data.records import RecordError
from robot_r1_jax.generate.sampling import SamplingParams
from robot_r1_jax.launch import compile as compile_lib
from robot_r1_jax.launch import console
from robot_r1_jax.launch import flagfiles
from robot_r1_jax.launch import flags as F
from robot_r1_jax.launch import mesh as mesh_lib
from robot_r1_jax.launch import pipeline, report
from robot_r1_jax.launch.config import RunConfig
from robot_r1_jax.model.config import ConfigError
from robot_r1_jax.model.hf_names import ConversionError
from robot_r1_jax.stages import evaluate as eval_lib
from robot_r1_jax.stages.context import StageContext
from robot_r1_jax.stages.rl import train_rl
from robot_r1_jax.stages.sft import train_sft
from robot_r1_jax.train.checkpoint import CheckpointError, restore_params
from robot_r1_jax.train.loop import TrainingStopped

Evaluator = Callable[[], eval_lib.EvalResult] | None


# Errors about the user's input or state on disk: their messages name the flag, file or key and
# what to do, so they are printed as one line (with the traceback under --verbosity=1 or more).
_USER_ERRORS = (pipeline.InputError, mesh_lib.MeshSpecError, compile_lib.CompileError,
                ConfigError, ConversionError, CheckpointError, RecordError, DemoError,
                TrainingStopped)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.quiet_libraries()
  with console.one_line_errors(*_USER_ERRORS):
    _run()


def _run() -> None:
  try:
    config = F.run_config()
  except ValueError as e:  # a config refused a flag's value; its message names the field
    raise pipeline.InputError(str(e)) from None
  if config.compile_only:
    _compile_only(config)
    return
  context = _setup(config)
  evaluator = eval_lib.split_evaluator(context, config.eval)
  if config.mode == "eval":
    _evaluate(config, context, evaluator)
  elif config.mode == "closed_loop":
    _closed_loop(config, context)
  else:
    _train(config, context, evaluator)


def _compile_only(config: RunConfig) -> None:
  """--compile_only: the memory report of every executable on --topology; fails naming those
  that do not fit."""
  # Deviceless: libtpu compiles for the named slice; this host's own accelerators stay untouched.
  jax.config.update("jax_platforms", "cpu")
  report = compile_lib.compile_run(config, only=config.compile_executables)
  print(report.table())
  print(f"report: {config.workdir / 'compile_report.json'}")
  if report.too_big:
    raise SystemExit("does not fit: " + ", ".join(
        f"{e.name} needs {e.peak / compile_lib.GIB:.2f} GiB per chip" for e in report.too_big)
        + f" of {report.hbm_per_chip / compile_lib.GIB:.0f} GiB on {config.topology}")


def _setup(config: RunConfig) -> StageContext:
  """Processes, mesh (checked before any data or model work), data, model, tokenizer."""
  dist = config.distributed
  mesh_lib.initialize_distributed(dist.coordinator_address, dist.num_processes, dist.process_id)
  mesh = mesh_lib.make_mesh(config.mesh)
  mesh_lib.check_batches(config.batch_sizes, mesh)
  data_dir = pipeline.data_dir(config.data, config.workdir / "data", config.seed)
  _, model, model_dir = pipeline.build_model(config.model, mesh=mesh, seed=config.seed)
  tokenizer, tokenizer_path = pipeline.load_tokenizer(config.model.tokenizer, model_dir)
  if config.init_from:
    step = restore_params(model, config.init_from)
    logging.info("initialised from %s (step %d)", config.init_from, step)
  logging.info("model=%s mesh=%s data=%s stage=%s mode=%s", config.model.name, dict(mesh.shape),
               data_dir, config.stage, config.mode)
  return StageContext(model=model, tokenizer=tokenizer, mesh=mesh, data_dir=data_dir,
                      loader=LoaderConfig(seed=config.seed, tokenizer_path=tokenizer_path),
                      meta=config.flags, tensor_parallel=config.rollout_tensor_parallel)


def _evaluate(config: RunConfig, context: StageContext, evaluator: Evaluator) -> None:
  """--mode=eval: the newest checkpoint (or --init_from) on the val split."""
  if evaluator is None:
    raise pipeline.InputError(f"--mode=eval: {context.data_dir} has no val questions")
  if not config.init_from:
    restore_params(context.model, config.workdir)
  result = evaluator()
  if jax.process_index() == 0:
    result.write(config.workdir / "eval.json")
    print(result.table())
    if config.judge.kind != "none":  # once, on process 0: a judge server need not see P copies
      _judge(config, context, result)


def _judge(config: RunConfig, context: StageContext, result: eval_lib.EvalResult) -> None:
  """--judge: the open-ended answers scored 0-3 into judge.json."""
  from robot_r1_jax.stages import judge as judge_lib

  spec = config.judge
  if spec.kind == "rule":
    judge = judge_lib.RuleJudge(records.Manifest.load(context.data_dir).questions.bins)
  else:
    judge = judge_lib.ChatJudge(spec.base_url, spec.model, spec.timeout_s,
                                api_key=os.environ.get("OPENAI_API_KEY"))
  report = judge_lib.judge_result(judge, spec.kind, result, context.data_dir)
  if not report.records:
    logging.warning("--judge=%s: %s has no open-ended val questions (an mcqa extraction); nothing "
                    "was judged", spec.kind, context.data_dir)
    return
  report.write(config.workdir / "judge.json")
  print(report.table())


def _closed_loop(config: RunConfig, context: StageContext) -> None:
  """--mode=closed_loop: the policies' answers drive the simulated arm; success per task.

  Every process runs the same episodes (the model's decoding is one program over the mesh); process
  0 writes closed_loop.json, the table and a contact sheet per episode under closed_loop/.
  """
  from robot_r1_jax.stages import closed_loop  # pybullet is optional: only closed loops need it

  spec = _closed_loop_config(config, context, config.closed_loop.episodes)
  policies = {"oracle": closed_loop.oracle_policy,
              "random": closed_loop.random_policy(config.seed, spec.mcqa)}
  if "model" in config.closed_loop.policies:
    if not config.init_from:
      restore_params(context.model, config.workdir)
    policies["model"] = _model_policy(config, context)
  out = config.workdir / "closed_loop" if jax.process_index() == 0 else None
  results = [closed_loop.run(name, policies[name], spec, out)
             for name in config.closed_loop.policies]
  if jax.process_index() == 0:
    closed_loop.write_json(results, config.workdir / "closed_loop.json")
    print(closed_loop.table(results))


def _closed_loop_config(config: RunConfig, context: StageContext, episodes: int):
  from robot_r1_jax.stages import closed_loop

  manifest = records.Manifest.load(context.data_dir)
  try:
    return closed_loop.ClosedLoopConfig(
        tasks=config.data.sim_tasks, episodes=episodes, seed=config.seed,
        # The questions and images the model was trained on: the extractor's settings.
        image_size=manifest.config.get("image_size") or config.data.image_size,
        mcqa=manifest.questions, batch_size=config.eval.batch_size,
        sheets=jax.process_index() == 0)
  except ValueError as e:
    raise pipeline.InputError(f"--mode=closed_loop (--sim_tasks, --data): {e}") from None


def _model_policy(config: RunConfig, context: StageContext):
  """Greedy answers of the context's model, its parameters at call time."""
  from robot_r1_jax.stages import closed_loop

  return closed_loop.model_policy(
      context.sampler(SamplingParams(temperature=0.0)), context.loader,
      max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size)


class _TrainingLoop:
  """The sft_rl job's closed loop on its own simulated tasks: the model before and after RL, the
  oracle and random baselines, in one table (closed_loop.json, sheets under closed_loop/)."""

  def __init__(self, config: RunConfig, context: StageContext):
    from robot_r1_jax.stages import closed_loop

    self._lib = closed_loop
    self._spec = _closed_loop_config(config, context, config.closed_loop.in_training)
    self._policy = _model_policy(config, context)
    self._out = config.workdir / "closed_loop" if jax.process_index() == 0 else None
    self._models = []  # in the order run, before the baselines in the table
    self._baselines = [closed_loop.run(name, policy, self._spec, self._out) for name, policy in (
        ("oracle", closed_loop.oracle_policy),
        ("random", closed_loop.random_policy(config.seed, self._spec.mcqa)))]

  def model(self, directory: str, label: str) -> None:
    """The model as it is now; sheets under closed_loop/`directory`, `label` in the table."""
    result = self._lib.run(directory, self._policy, self._spec, self._out)
    self._models.append(dataclasses.replace(result, policy=label))

  def table(self) -> str:
    return self._lib.table(self._models + self._baselines)

  def write(self, path) -> None:
    self._lib.write_json(self._models + self._baselines, path)


def _train(config: RunConfig, context: StageContext, evaluator: Evaluator) -> None:
  """The stages --stage names; sft_rl evaluates before and after RL and plots the curves."""
  workdir, two_stage = config.workdir, config.stage == "sft_rl"
  if config.stage in ("sft_rl", "sft"):
    train_sft(context, config.sft, workdir / "sft" if two_stage else workdir)
  if config.stage == "sft":
    return
  # The reference policy is the model as it is now (after SFT or --init_from).
  before = evaluator() if evaluator and two_stage else None
  algo = config.rl.step.algo.upper()
  # Closed loops need the simulator's tasks: only the job's own simulated data has them for sure.
  loop = (_TrainingLoop(config, context) if two_stage and config.data.path is None
          and config.closed_loop.in_training else None)
  if loop:
    loop.model("sft", "SFT")
  history = train_rl(context, config.rl, workdir / "rl" if two_stage else workdir,
                     evaluate=evaluator)
  if jax.process_index() == 0 and history:
    last = history[-1]
    print(f"done: step {last['step']} reward {last['reward/total']:.3f} "
          f"accuracy {last['accuracy/all']:.3f}; workdir "
          f"{workdir if atomic.is_remote(workdir) else workdir.resolve()}")
  if before is not None:
    after = evaluator()
    if jax.process_index() == 0:
      before.write(workdir / "eval_before_rl.json")
      after.write(workdir / "eval_after_rl.json")
      print(eval_lib.compare_table(before, after, labels=("SFT", f"SFT→{algo}")))
  if loop:
    loop.model(f"sft_{algo.lower()}", f"SFT→{algo}")
    if jax.process_index() == 0:
      loop.write(workdir / "closed_loop.json")
      print(loop.table())
  if before is not None and jax.process_index() == 0:
    print(f"curves: {report.plot_curves(workdir)}")


if __name__ == "__main__":
  console.skip_absent_tpu()
  flags.adopt_module_key_flags(F)  # --help lists every training flag, not just this module's
  try:  # Recipes include recipes: resolved against the including file (see `flagfiles`).
    expanded = flagfiles.expand(sys.argv)
  except flagfiles.FlagfileError as e:
    sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.")
  app.run(main, argv=expanded)
