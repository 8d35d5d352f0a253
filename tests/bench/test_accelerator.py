"""bench/accelerator.py on this CPU: the `small` preset at small shapes runs end to end, sharded over
4 of the fake devices as the paper recipe shards it, and every figure is a finite, positive number
(the script is kept working for when a GPU or TPU is at hand)."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench"


def _load():
  sys.path.insert(0, str(BENCH))  # it imports bench/train_step.py, as it does when run
  try:
    spec = importlib.util.spec_from_file_location("accelerator", BENCH / "accelerator.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["accelerator"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module
  finally:
    sys.path.remove(str(BENCH))


def test_small_preset_smoke(capsys):
  accelerator = _load()
  [figures] = accelerator.main(["--models=small", "--devices=4", "--rows=2", "--prompts=1",
                                "--generations=2",
                                "--prompt_length=128", "--new_tokens=8", "--image_px=56",
                                "--repeats=1"])
  for value in (figures.update_s, figures.mfu, figures.rollout_tokens_per_s,
                figures.decode_step_s, figures.decode_floor_s):
    assert math.isfinite(value) and value > 0, figures
  assert figures.devices == 4
  assert figures.peak_bytes is None  # the CPU backend reports no allocator peak
  out = capsys.readouterr().out
  assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in out
  assert "small on 4 devices: update" in out

