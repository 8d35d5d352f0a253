"""`--compile_only --topology=…`: every executable of a run compiled for a TPU slice on this CPU host
(libtpu's deviceless compile), its memory per chip against HBM, and clear refusals of bad input."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import pytest

from robot_r1_jax.launch import compile as compile_lib
from robot_r1_jax.launch import hlo
from robot_r1_jax.launch.config import RunConfig
from robot_r1_jax.model import config as model_config
from robot_r1_jax.stages.rl import RLConfig
from robot_r1_jax.stages.rl_step import LearnerConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[tpu]')")


# What a tiny run needs on v5e:2x2 (4 chips): every batch splits over fsdp = 4.
TINY = ["--model=tiny", "--image_size=64", "--max_new_tokens=16", "--num_generations=2",
        "--rollout_batch_size=4", "--train_batch_size=2", "--micro_batch_size=4",
        "--sft_batch_size=4", "--eval_batch_size=4"]


def _compile(workdir: pathlib.Path, *flags: str) -> tuple[dict, str]:
  """`--compile_only` in a fresh process (deviceless compiles cannot share the test session's
  persistent compilation cache); returns the JSON report and the output."""
  proc = subprocess.run([sys.executable, "-m", "robot_r1_jax.launch", "--compile_only",
                         "--topology=v5e:2x2", f"--workdir={workdir}", *TINY, *flags],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads((workdir / "compile_report.json").read_text()), proc.stdout


@needs_libtpu
def test_tiny_run_compiles_for_v5e_2x2_and_fits(tmp_path):
  report, out = _compile(tmp_path)
  names = [e["name"] for e in report["executables"]]
  assert names == ["sft_step", "eval_layout", "eval_prefill", "eval_decode", "rollout_layout",
                   "rollout_prefill", "rollout_decode", "reference_log_probs", "old_log_probs",
                   "rl_update"]
  assert report["chips"] == 4 and report["hbm_per_chip"] == 16 * 2**30
  for e in report["executables"]:
    assert 0 < e["peak"] < report["hbm_per_chip"], e
    # XLA gives one program's peak (the layout copy is several: the sum of its columns).
    bound = e["arguments"] + e["outputs"] + e["temps"] - e["aliased"]
    assert (e["heap"] > 0) != e["name"].endswith("_layout"), e
    assert e["peak"] == (e["heap"] or bound) + e["resident"], e
  assert "[10/10] compiling rl_update" in out
  assert any(line.startswith("rl_update ") for line in out.splitlines())
  # The decode loop writes the cache into the donated prefill cache, and runs on the rollout
  # layout: its body all-reduces activations (tensor parallel) but gathers no weight.
  decode = next(e for e in report["executables"] if e["name"] == "rollout_decode")
  assert decode["aliased"] > 0
  loop = [l for l in decode["loops"] if l["loop"] == "jit(_decode_impl)/while"]
  assert loop and all("all-gather" not in l["counts"] for l in loop), loop
  assert "rollout_decode · jit(_decode_impl)/while: all-reduce ×" in out
  # The update's layer loops do gather (FSDP): the report would show a gather where one is.
  update = next(e for e in report["executables"] if e["name"] == "rl_update")
  assert any("all-gather" in l["counts"] for l in update["loops"])
  # While decoding, the trainer's parameters, optimizer state and reference stay in HBM; while
  # updating, only the reference is not an argument.
  assert decode["resident"] > update["resident"] > 0
  # The roofline: every program moves bytes, all but the layout copies multiply; each one's
  # time floor is positive and its MFU bound at most 1.
  for e in report["executables"]:
    assert e["cost"]["bytes"] > 0 and 0 < e["floor_seconds"] and 0 <= e["mfu_bound"] <= 1, e
    assert (e["cost"]["flops"] > 0) != e["name"].endswith("_layout"), e
  # The decode loop stops on data and is charged its 64-token bucket (its layers, a scan, each
  # count); top-p's redraws (the first token's, and one inside the loop) stop on data too and are
  # charged one round each. Per chip, 64 tokens of 8 rows / data=2, the weights and heads /
  # tensor=2: the layers' matmuls, attention over the 512 + 64 cache, the head (the tensor split
  # of a 1031-token vocabulary is XLA's to choose).
  assert decode["cost"]["assumed_loops"] == 3 and report["shapes"]["new_tokens"] == 64
  text = model_config.PRESETS["tiny"]().text
  d, kv = text.hidden_size, text.num_kv_heads * text.hidden_size // text.num_heads
  layer = 2 * d * d + 2 * d * kv + 3 * d * text.intermediate_size + 2 * d * (512 + 64)
  analytic = 64 * 4 * 2 * (text.num_layers * layer + text.vocab_size * d) / 2
  assert analytic < decode["cost"]["flops"] < 1.5 * analytic, (decode["cost"], analytic)
  assert "TFLOP/s" in out.splitlines()[next(i for i, l in enumerate(out.splitlines())
                                            if l.startswith("tiny on v5e:2x2"))]
  # On TPU, attention is the splash kernel (--attention=auto): prefill, scoring and the update
  # call it (the update its backward kernels too); the decode step does not.
  kernels = {e["name"]: e["kernels"] for e in report["executables"]}
  for name in ("rollout_prefill", "eval_prefill", "old_log_probs", "reference_log_probs",
               "rl_update", "sft_step"):
    assert any(k.startswith("splash_mha_fwd") for k in kernels[name]), (name, kernels[name])
  for name in ("rl_update", "sft_step"):
    assert any(k.startswith("splash_mha_dq") for k in kernels[name]), (name, kernels[name])
    assert any(k.startswith("splash_mha_dkv") for k in kernels[name]), (name, kernels[name])
  assert not kernels["rollout_decode"] and not kernels["rollout_layout"]
  assert "Pallas kernels (call sites" in out


@needs_libtpu
def test_rollout_memory_grows_linearly_with_the_images(tmp_path):
  """Twice the rollout images, at most ~twice the prefill's memory per chip (the packed vision
  attention grew with their square). 224² images and a short prompt bucket: the vision tower is
  what the prefill's memory is made of."""
  def peak(prompts: int, chunk: int = 0) -> int:
    report, _ = _compile(tmp_path / f"{prompts}_{chunk}", "--stage=rl", "--num_generations=1",
                         "--image_size=224", "--compile_prompt_length=128",
                         f"--rollout_batch_size={prompts}", f"--train_batch_size={prompts}",
                         f"--rollout_chunk_size={chunk}", "--compile_executables=rollout_prefill")
    # The prefill reads the rollout layout's parameters: that is compiled too.
    assert [e["name"] for e in report["executables"]] == ["rollout_layout", "rollout_prefill"]
    return report["executables"][1]["peak"]

  assert peak(128) <= 2.3 * peak(64)
  # In chunks of 64 prompts, a rollout of 128 compiles (and holds) one chunk's prefill.
  assert peak(128, chunk=64) == peak(64)


@needs_libtpu
def test_an_offloaded_reference_leaves_hbm_while_the_update_runs(tmp_path):
  runs = {}
  for name, flags in (("kept", ()), ("offloaded", ("--offload_reference",))):
    report, out = _compile(tmp_path / name, "--stage=rl",
                           "--compile_executables=reference_log_probs,rl_update", *flags)
    runs[name] = {e["name"]: e for e in report["executables"]}
  kept, offloaded = runs["kept"], runs["offloaded"]
  # The update no longer holds the reference beside its own state; the reference's scoring
  # takes it as an argument in HBM (copied in), the same program either way.
  assert kept["rl_update"]["resident"] > 0 and offloaded["rl_update"]["resident"] == 0
  assert kept["rl_update"]["peak"] - offloaded["rl_update"]["peak"] == kept["rl_update"][
      "resident"]
  for column in ("arguments", "peak"):
    assert offloaded["reference_log_probs"][column] == kept["reference_log_probs"][column]
  assert "copied in from host memory" in out


@pytest.mark.parametrize("topology", ["v9x:2x2", "v5e", "4x4"])
def test_unknown_topology_lists_the_known_forms(topology):
  with pytest.raises(compile_lib.CompileError, match="known forms: v5e:2x2"):
    compile_lib.topology_devices(topology)


def test_missing_libtpu_names_the_extra(monkeypatch):
  monkeypatch.setattr(compile_lib.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(compile_lib.CompileError, match=r"pip install .*\[tpu\]"):
    compile_lib.topology_devices("v5e:2x2")


@needs_libtpu
def test_a_layout_the_slice_cannot_take_names_the_flag(tmp_path):
  base = RunConfig(workdir=tmp_path, compile_only=True, topology="v5e:2x2")
  with pytest.raises(compile_lib.CompileError, match="--mesh"):
    compile_lib.compile_run(dataclasses.replace(base, mesh="data=3,fsdp=-1,tensor=1"))
  odd = RLConfig(step=LearnerConfig(micro_batch_size=6, train_batch_size=6, num_generations=5),
                 rollout_batch_size=12)
  with pytest.raises(compile_lib.CompileError, match="micro_batch_size"):
    compile_lib.compile_run(dataclasses.replace(base, rl=odd))
  chunked = RLConfig(step=LearnerConfig(micro_batch_size=4, train_batch_size=4),
                     rollout_batch_size=8, rollout_chunk_size=2)
  with pytest.raises(compile_lib.CompileError, match="--rollout_chunk_size=2 .* multiple of 4"):
    compile_lib.compile_run(dataclasses.replace(base, rl=chunked))
  with pytest.raises(ValueError, match="rollout_chunk_size=3 must be 0 or divide"):
    RLConfig(rollout_chunk_size=3)
  with pytest.raises(compile_lib.CompileError, match="no executable"):
    compile_lib.compile_run(base, only=("nothing",))
  # Only the batches of the stages that run are laid out: an RL run has no SFT step.
  odd_sft = dataclasses.replace(base, sft=dataclasses.replace(base.sft, batch_size=3))
  with pytest.raises(compile_lib.CompileError, match="sft_batch_size"):
    compile_lib.compile_run(odd_sft)
  with pytest.raises(compile_lib.CompileError, match=r"no executable \['sft_step'\]"):
    compile_lib.compile_run(dataclasses.replace(odd_sft, stage="rl"), only=("sft_step",))


def test_an_unreadable_hlo_text_costs_the_loop_columns_not_the_report():
  class Compiled:  # as libtpu 0.0.52 answers as_text() for the 7B paper recipe's update
    def as_text(self):
      raise jax.errors.JaxRuntimeError(
          "INTERNAL: RET_CHECK failure (hlo_instruction.cc:1) async-update instruction should "
          "have 1 operands but sees 3\n*** Begin stack trace ***")

  loops, cost, kernels, error = compile_lib.read_hlo(Compiled())
  assert loops is None and cost is None and kernels is None and error == (
      "JaxRuntimeError: INTERNAL: RET_CHECK failure (hlo_instruction.cc:1) async-update "
      "instruction should have 1 operands but sees 3")
  unread = compile_lib.Executable(name="rl_update", what="", arguments=2**30, outputs=0, temps=0,
                                  aliased=0, compile_seconds=1.0, loops=None, hlo_error=error)
  report = compile_lib.Report(
      topology="v5p:2x2x4", chips=16, hbm_per_chip=95 * 2**30, peak_flops=459e12,
      hbm_bandwidth=2.76e12, mesh={"fsdp": 16},
      model="qwen2_5_vl_7b", shapes=compile_lib.Shapes(512, (1, 16, 16), 1024, 16),
      executables=(unread,))
  assert report.table().splitlines()[3].split()[-7:] == ["1%", "yes"] + ["n/a"] * 5
  row = json.loads(report.to_json())["executables"][0]
  assert row["hlo_error"] == error and row["floor_seconds"] is None and row["cost"] is None


def test_the_report_names_what_does_not_fit():
  loop = hlo.LoopCollectives(loop="jit(_decode_impl)/while", counts={"all-reduce": 56},
                             bytes={"all-reduce": 3 * 2**19})
  row = lambda name, temps, loops=(): compile_lib.Executable(
      name=name, what="", arguments=2 * 2**30, outputs=2**30, temps=temps, aliased=2**30,
      compile_seconds=1.0, loops=loops, cost=hlo.Cost(flops=4e12, bytes=4e9))
  report = compile_lib.Report(
      topology="v5e:4x4", chips=16, hbm_per_chip=16 * 2**30, peak_flops=200e12,
      hbm_bandwidth=0.8e12, mesh={"data": 1, "fsdp": 16},
      model="qwen2_5_vl_7b", shapes=compile_lib.Shapes(512, (1, 16, 16), 1024, 16),
      executables=(row("rollout_decode", 4 * 2**30, (loop,)), row("rl_update", 15 * 2**30)))
  assert [e.name for e in report.too_big] == ["rl_update"]
  assert report.executables[0].peak == 6 * 2**30
  lines = report.table().splitlines()
  # 4 TFLOP take 20 ms at 200 TFLOP/s, 4 GB 5 ms at 0.8 TB/s: compute bound, MFU at most 100%.
  assert lines[3].split()[-7:] == ["38%", "yes", "1.50", "4", "4", "20", "100%"]
  assert lines[3].startswith("rollout_decode")
  assert lines[4].split()[-8:] == ["17.00", "106%", "NO", "0.00", "4", "4", "20", "100%"]
  assert lines[-1] == ("  rollout_decode · jit(_decode_impl)/while: all-reduce ×56 (1.50 MiB) per "
                       "iteration")
  # State that stays in HBM beside an executable's arguments counts towards its peak.
  assert dataclasses.replace(report.executables[1], resident=2**30).peak == 18 * 2**30
  data = json.loads(report.to_json())["executables"]
  assert data[1]["peak"] == 17 * 2**30 and data[0]["loops"][0]["counts"] == {"all-reduce": 56}
  assert data[0]["floor_seconds"] == 0.02 and data[0]["mfu_bound"] == 1.0
  # Memory bound: 40 GB take 50 ms, the FLOPs 20 of them, so MFU is at most 40%.
  slow = dataclasses.replace(report.executables[0], cost=hlo.Cost(flops=4e12, bytes=40e9))
  assert report.roofline(slow) == pytest.approx((0.05, 0.4))
