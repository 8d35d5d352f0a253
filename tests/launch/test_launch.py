"""`python -m robot_r1_jax.launch` end to end in subprocesses: default job, resume, SIGTERM, mesh."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable

import pytest
from etils import epath

pytest.importorskip("pybullet")

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMALL = ["--stage=rl", "--model=tiny", "--num_generations=2", "--rollout_batch_size=2", "--train_batch_size=1",
         "--micro_batch_size=2", "--max_new_tokens=16", "--learning_rate=1e-3",
         "--checkpoint_every=1", "--kl_coef=0.01"]


def _env(devices: int = 1) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = str(ROOT)
  return env


def _launch(*args: str, devices: int = 1, wait: bool = True, timeout: int = 600,
            env: dict[str, str] | None = None):
  cmd = [sys.executable, "-m", "robot_r1_jax.launch", *args]
  proc = subprocess.Popen(cmd, env=env or _env(devices), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-4000:]
  return out


def _metrics(workdir: pathlib.Path) -> dict[int, dict]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: {k: v for k, v in r.items() if not k.startswith(("time/", "compiles/"))}
          for r in rows}


@pytest.fixture(scope="module")
def default_job(tmp_path_factory) -> pathlib.Path:
  """The default main job (simulate → extract → SFT → GRPO → eval), shortened."""
  workdir = tmp_path_factory.mktemp("default")
  # As a user runs it: JAX picks its backend itself (the TPU plugin is installed with the test
  # extras; the launcher must not probe it on a host without a TPU), output captured to a file.
  env = {k: v for k, v in _env().items() if k != "JAX_PLATFORMS"}
  out = _launch(f"--workdir={workdir}", "--sim_tasks=push_button", "--sim_episodes=2",
                "--image_size=64", "--sft_steps=3", "--max_steps=2", "--eval_batch_size=4",
                *[a for a in SMALL if a != "--stage=rl"], env=env)
  (workdir / "console.txt").write_text(out)
  assert "done: step 2" in out
  assert "accuracy SFT→GRPO" in out  # the before/after table
  return workdir


def test_default_main_job_prints_little_besides_progress(default_job):
  out = (default_job / "console.txt").read_text()
  assert "\r" not in out  # not a terminal: plain progress lines, no redraws
  progress = re.compile(r"^(sft|rl|eval|closed loop \w+) \d+/\d+ ")
  lines = [line for line in out.splitlines() if not progress.match(line)]
  assert len(lines) < 60, "\n".join(lines)
  for noise in ("checkpoint_manager.py", "orbax", "Unable to initialize backend", "TPU"):
    assert noise not in out, noise
  # One line per save: every step of sft (3) and rl (2) with --checkpoint_every=1.
  assert sum("checkpoint: saving step" in line for line in lines) == 5


@pytest.fixture
def data(extracted_data) -> pathlib.Path:
  return extracted_data


def test_default_main_job_writes_everything(default_job):
  assert (default_job / "data" / "extracted" / "manifest.json").exists()
  for stage, steps in (("sft", 3), ("rl", 2)):
    assert (default_job / stage / "checkpoints" / str(steps)).is_dir(), stage
    assert list((default_job / stage / "tb").glob("events.out.tfevents.*")), stage
    assert sorted(_metrics(default_job / stage)) == list(range(1, steps + 1)), stage
  rollouts = [json.loads(line)
              for line in (default_job / "rl" / "rollouts.jsonl").read_text().splitlines()]
  assert len(rollouts) == 2 * 2 * 2 and {"completion", "reward"} <= set(rollouts[0])
  before = json.loads((default_job / "eval_before_rl.json").read_text())
  after = json.loads((default_job / "eval_after_rl.json").read_text())
  assert len(before["records"]) == len(after["records"]) > 0
  # The closed loop on the job's own task: one episode per policy, the two models in the table.
  loop = json.loads((default_job / "closed_loop.json").read_text())
  assert sorted(loop) == ["SFT", "SFT→GRPO", "oracle", "random"]
  assert all(loop[p]["episodes"] == 1 and "push_button" in loop[p]["success_rate"] for p in loop)
  assert loop["oracle"]["success_rate"]["all"] == 1.0
  assert len(list((default_job / "closed_loop" / "sft_grpo").glob("push_button_*.png"))) == 1
  assert re.search(r"^closed loop success +SFT +SFT→GRPO +oracle +random$",
                   (default_job / "console.txt").read_text(), re.M)
  png = (default_job / "curves.png").read_bytes()
  assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_eval_mode_scores_the_newest_checkpoint(default_job):
  out = _launch(f"--workdir={default_job}", "--mode=eval",
                f"--data={default_job / 'data' / 'extracted'}",
                "--eval_batch_size=4", *SMALL)
  result = json.loads((default_job / "eval.json").read_text())
  assert "question type" in out and len(result["records"]) > 0


def test_closed_loop_mode_drives_the_arm_with_each_policy(default_job):
  out = _launch(f"--workdir={default_job}", "--mode=closed_loop",
                f"--data={default_job / 'data' / 'extracted'}", "--sim_tasks=push_button",
                "--closed_loop_episodes=2", "--eval_batch_size=4", *SMALL)
  result = json.loads((default_job / "closed_loop.json").read_text())
  assert list(result) == ["model", "oracle", "random"]
  assert result["oracle"]["success_rate"] == {"push_button": 1.0, "all": 1.0}
  assert all(len(r["per_episode"]) == 2 for r in result.values())
  # Greedy decoding of the trained checkpoint, 16 new tokens per keyframe.
  assert all(len(e["completions"]) == e["keyframes"] for e in result["model"]["per_episode"])
  assert re.search(r"^closed loop success +model +oracle +random$", out, re.M), out[-2000:]
  assert len(list((default_job / "closed_loop" / "model").glob("push_button_*.png"))) == 2


@pytest.fixture(scope="module")
def straight(extracted_data, tmp_path_factory) -> dict[int, dict]:
  """The metrics of a 4-step run that nothing interrupts."""
  workdir = tmp_path_factory.mktemp("straight")
  _launch(f"--workdir={workdir}", "--max_steps=4", f"--data={extracted_data}", *SMALL)
  return _metrics(workdir)


def _kill_after_step_2_and_resume(workdir: str, data: pathlib.Path,
                                  committed: Callable[[], bool]) -> None:
  steps = ["--max_steps=4", f"--data={data}", *SMALL]
  proc = _launch(f"--workdir={workdir}", *steps, wait=False)
  deadline = time.time() + 600
  while not committed():
    assert proc.poll() is None, proc.stdout.read()[-4000:]
    assert time.time() < deadline
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  _launch(f"--workdir={workdir}", *steps)


def test_resume_after_sigkill_repeats_the_uninterrupted_run(data, straight, tmp_path):
  killed = tmp_path / "killed"
  _kill_after_step_2_and_resume(str(killed), data, (killed / "checkpoints" / "2").is_dir)
  steps = ["--max_steps=4", f"--data={data}", *SMALL]
  resumed = _metrics(killed)
  assert sorted(resumed) == [1, 2, 3, 4]
  for step in (3, 4):
    assert resumed[step] == straight[step], step

  # Damaged on disk after its commit (every other file cut in half): the next run skips step 4,
  # says so, resumes from step 3 and repeats step 4 as the uninterrupted run did.
  step4 = killed / "checkpoints" / "4"
  files = sorted(p for p in step4.rglob("*") if p.is_file() and p.stat().st_size > 1)[::2]
  for path in files:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  out = _launch(f"--workdir={killed}", *steps)
  assert "step 4" in out and "does not restore" in out, out[-4000:]
  assert "resumed from" in out and "at step 3" in out, out[-4000:]
  assert (killed / "checkpoints" / "damaged" / "4").is_dir()
  assert _metrics(killed)[4] == straight[4]


def test_resume_after_sigkill_from_a_bucket_repeats_the_uninterrupted_local_run(
    data, straight, gcs_bucket):
  """The whole workdir (checkpoints, metrics, rollouts) in a bucket of a local emulator."""
  url = os.environ["STORAGE_EMULATOR_HOST"]
  step2 = urllib.parse.quote("run/checkpoints/2/commit_success.txt", safe="")

  def committed() -> bool:  # asked of the emulator directly: gcsfs would answer from its cache
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b/test/o/{step2}", timeout=5).close()
      return True
    except urllib.error.HTTPError:
      return False

  _kill_after_step_2_and_resume(f"{gcs_bucket}/run", data, committed)
  resumed = _metrics(epath.Path(gcs_bucket) / "run")
  assert sorted(resumed) == [1, 2, 3, 4]
  for step in (1, 2, 3, 4):
    assert resumed[step] == straight[step], step
  rollouts = (epath.Path(gcs_bucket) / "run" / "rollouts.jsonl").read_text().splitlines()
  assert sorted({json.loads(line)["step"] for line in rollouts}) == [1, 2, 3, 4]


def test_sigterm_saves_the_current_step(data, tmp_path):
  proc = _launch(f"--workdir={tmp_path}", "--max_steps=50", f"--data={data}",
                 *[a for a in SMALL if not a.startswith("--checkpoint_every")],
                 "--checkpoint_every=1000", wait=False)
  deadline = time.time() + 600
  while not (tmp_path / "metrics.jsonl").exists() or not _metrics(tmp_path):
    assert proc.poll() is None, proc.stdout.read()[-4000:]
    assert time.time() < deadline
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-4000:]
  last = max(_metrics(tmp_path))
  assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == [str(last)]


def test_three_axis_mesh_runs_and_bad_mesh_fails_fast(data, tmp_path):
  _launch(f"--workdir={tmp_path / 'ok'}", "--mesh=data=2,fsdp=2,tensor=2", f"--data={data}",
          "--stage=rl",
          "--max_steps=1", "--model=tiny", "--num_generations=2", "--rollout_batch_size=4",
          "--train_batch_size=2", "--micro_batch_size=4", "--max_new_tokens=16", devices=8)
  proc = subprocess.run([sys.executable, "-m", "robot_r1_jax.launch", "--mesh=data=3,fsdp=-1",
                         f"--workdir={tmp_path / 'bad'}", f"--data={data}"],
                        env=_env(8), cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "does not divide the 8 devices" in proc.stderr


def test_bad_input_is_one_line_naming_the_flag_or_file(data, tmp_path):
  cut = tmp_path / "cut_model"
  cut.mkdir()
  (cut / "config.json").write_text('{"model_type": "qwen2_5_vl", "text_config": {"hidden_si')
  demos = tmp_path / "demos" / "push_button" / "variation0"
  demos.mkdir(parents=True)
  cases = {
      "nowhere": ([f"--data={tmp_path / 'nowhere'}"], "--data=.*nowhere: no such directory"),
      "demos": ([f"--data={tmp_path / 'demos'}"],
                "has no manifest.json: not extractor output .*extract them first"),
      "cut config": ([f"--data={data}", f"--model={cut}"],
                     r"cut_model/config.json is not valid JSON .*download it again"),
      "no init": ([f"--data={data}", f"--init_from={tmp_path / 'empty'}", "--model=tiny"],
                  "no checkpoint under .*empty"),
      "data in a bucket": (["--data=gs://bucket/extracted"],
                           "--data=gs://bucket/extracted: .*local disk only; .*gcsfuse"),
      "default data, bucket workdir": (["--workdir=gs://bucket/run"],
                                       "--workdir on object storage needs --data"),
      "closed loop, no such task": ([f"--data={data}", "--mode=closed_loop", "--sim_tasks=fly",
                                     "--closed_loop_policy=oracle"],
                                    r"--sim_tasks.*no simulated task \['fly'\]; available: "),
      "closed loop, no such policy": (["--mode=closed_loop", "--closed_loop_policy=expert"],
                                      r"closed_loop_policy=\['expert'\]: choose from"),
      "chat judge, no server": (["--mode=eval", "--judge=chat"],
                                "judge=chat needs --judge_base_url and --judge_model"),
      "judge in training": (["--judge=rule"], "--judge=rule scores an evaluation: add --mode=eval"),
  }
  for name, (args, message) in cases.items():
    proc = subprocess.run([sys.executable, "-m", "robot_r1_jax.launch", "--stage=rl",
                           f"--workdir={tmp_path / 'run'}", *args], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, (name, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, (name, proc.stderr[-3000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(message, last), (name, last)
  proc = subprocess.run([sys.executable, "-m", "robot_r1_jax.launch", "--verbosity=1",
                         f"--data={tmp_path / 'nowhere'}"], env=_env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and "Traceback" in proc.stderr  # asked for


def test_dynamic_sampling_resumes_past_its_extra_draws(data, tmp_path):
  """Draws beyond the step's own batch come from the checkpointed iterator: a run stopped after
  step 2 and resumed gives step 3 exactly as a run that never stopped."""
  flags = [f"--data={data}", "--batch_filter=informative", "--max_draws=3", *SMALL]
  _launch(f"--workdir={tmp_path / 'straight'}", "--max_steps=3", *flags)
  _launch(f"--workdir={tmp_path / 'resumed'}", "--max_steps=2", *flags)
  _launch(f"--workdir={tmp_path / 'resumed'}", "--max_steps=3", *flags)
  straight, resumed = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
  assert sorted(resumed) == [1, 2, 3]
  assert all(1 <= m["dynamic_sampling/draws"] <= 3 for m in straight.values())
  assert sum(m["dynamic_sampling/draws"] for m in straight.values()) > 3  # it did draw more
  assert resumed[3] == straight[3]


def test_action_tokens_train_evaluate_and_drive_the_arm(tmp_path, judge_stub):
  """--answer_format=action_tokens through the default job: the questions ask for bins, SFT and
  GRPO steps run on them, evaluation reports bin accuracy and metres, the closed loop executes
  the bins, a chat judge (a stub server) scores the answers; the same workdir refuses to reuse its
  data under another format."""
  workdir = tmp_path / "tokens"
  args = [f"--workdir={workdir}", "--answer_format=action_tokens", "--sim_tasks=push_button",
          "--sim_episodes=2", "--image_size=32", "--sft_steps=1", "--max_steps=1",
          "--eval_batch_size=4", *[a for a in SMALL if a != "--stage=rl"]]
  out = _launch(*args)
  record = json.loads((workdir / "eval_after_rl.json").read_text())["records"][0]
  assert re.fullmatch(r"\d+ \d+ \d+", record["answer"]), record
  assert re.search(r"^question type .* bins SFT +bins SFT→GRPO$", out, re.M), out[-3000:]
  assert sorted(_metrics(workdir / "rl")) == [1] and sorted(_metrics(workdir / "sft")) == [1]
  loop = json.loads((workdir / "closed_loop.json").read_text())
  assert loop["oracle"]["success_rate"]["all"] == 1.0 and loop["oracle"]["mean_l1"] < 0.006

  out = _launch(f"--workdir={workdir / 'rl'}", f"--data={workdir / 'data' / 'extracted'}",
                "--mode=eval", "--judge=chat", f"--judge_base_url={judge_stub.base_url}",
                "--judge_model=stub", "--eval_batch_size=4", "--max_new_tokens=16")
  judged = json.loads((workdir / "rl" / "judge.json").read_text())
  evaluated = json.loads((workdir / "rl" / "eval.json").read_text())["records"]
  assert judged["count"] == len(evaluated) == len(judge_stub.requests) > 0
  assert all(r["score"] in (0, 3) and r["reason"] == "stub verdict" for r in judged["records"])
  assert "judge: chat" in out
  proc = subprocess.run([sys.executable, "-m", "robot_r1_jax.launch", *args[:1], "--stage=rl"],
                        env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and re.search(
      r"made with --answer_format=action_tokens; pass those flags", proc.stderr), proc.stderr[-2000:]
