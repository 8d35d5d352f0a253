"""bench/sweep.py's summary: the table's mean ± half-spread and the beats-the-spread verdict."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "sweep", pathlib.Path(__file__).resolve().parents[2] / "bench" / "sweep.py")
sweep = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(sweep)


def _seed(sft: float, rl: float, movement_rl: float) -> dict:
  return {"direct-SFT": {"waypoint": sft, "current_state": 0.25, "movement": 0.30, "all": None},
          "direct-SFT→grpo": {"waypoint": rl, "current_state": 0.25, "movement": movement_rl,
                              "all": None}}


def test_summary_means_spreads_and_verdicts():
  per_seed = {0: _seed(0.20, 0.41, 0.33), 1: _seed(0.26, 0.47, 0.25), 2: _seed(0.23, 0.44, 0.35)}
  table, stats = sweep.summarise(per_seed)
  assert stats["direct-SFT→grpo"]["waypoint"] == {
      "mean": pytest.approx(0.44), "spread": pytest.approx(0.06), "n": 3}
  assert stats["direct-SFT"]["all"]["n"] == 0  # no seed reported it: left out, not zero
  assert "| direct-SFT→grpo | 44.0 ± 3.0 | 25.0 ± 0.0 | 31.0 ± 5.0 |" in table
  lines = sweep.verdicts(stats)
  # waypoint: +21 points against a 6-point spread; current_state: no gain; movement: +1 point
  # against a 10-point spread (the RL runs' own spread counts, not only the baseline's).
  assert lines == [
      "direct-SFT→grpo vs direct-SFT on waypoint: +21.0 points, seed spread 6.0 -> beats it",
      "direct-SFT→grpo vs direct-SFT on current_state: +0.0 points, seed spread 0.0 -> "
      "does not beat it",
      "direct-SFT→grpo vs direct-SFT on movement: +1.0 points, seed spread 10.0 -> "
      "does not beat it"]
