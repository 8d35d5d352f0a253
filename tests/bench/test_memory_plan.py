"""bench/memory_plan.py: the table's cells and verdicts, and a kept report reused (a resumed plan
compiles nothing again)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

_SPEC = importlib.util.spec_from_file_location(
    "memory_plan", pathlib.Path(__file__).resolve().parents[2] / "bench" / "memory_plan.py")
memory_plan = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(memory_plan)

GIB = 2**30


def _report(hbm_gib: int, **peaks_gib: float) -> dict:
  return {"hbm_per_chip": hbm_gib * GIB,
          "executables": [{"name": n, "peak": int(p * GIB)} for n, p in peaks_gib.items()]}


def test_table_rows_cells_and_verdicts():
  text = memory_plan.table({
      ("m3", "v5e:4x4"): _report(16, rollout_prefill=4.0, rl_update=14.0),  # 88%
      ("m7", "v5e:4x4"): _report(16, rollout_prefill=6.0, rl_update=15.5),  # 97%
      ("m7", "v4:2x2x4"): _report(32, rollout_prefill=6.0, old_log_probs=3.0, rl_update=40.0),
      ("m7", "v6e:4x4"): "Traceback …",
  })
  lines = text.splitlines()
  assert lines[0] == ("| model | slice (HBM/chip) | `rollout_prefill` | `rl_update` | "
                      "`old_log_probs` | fits |")
  assert lines[2] == "| m3 | v5e:4x4 (16 GiB) | 4.0 (25%) | 14.0 (88%) | — | yes |"
  assert lines[3].endswith("| 15.5 (97%) | — | tight |")
  assert lines[4] == "| m7 | v4:2x2x4 (32 GiB) | 6.0 (19%) | 40.0 (125%) | 3.0 (9%) | **no** |"
  assert lines[5] == "| m7 | v6e:4x4 | — | — | — | compile failed |"


def test_roofline_cells():
  report = _report(16, rollout_decode=4.0, rl_update=14.0)
  report["executables"][0].update(floor_seconds=0.0123, mfu_bound=0.031)
  report["executables"][1].update(floor_seconds=None, mfu_bound=None)  # an unreadable HLO
  text = memory_plan.roofline({("m7", "v5e:4x4"): report, ("m7", "v6e:4x4"): "Traceback …"})
  assert text.splitlines() == ["| model | slice | `rollout_decode` | `rl_update` |",
                               "|---|---|---|---|",
                               "| m7 | v5e:4x4 | 12.3 (3%) | — |",
                               "| m7 | v6e:4x4 | — | — |"]


def test_a_kept_report_is_reused(tmp_path, monkeypatch):
  kept = tmp_path / "m7_v5p_2x2x4" / "compile_report.json"
  kept.parent.mkdir()
  kept.write_text(json.dumps(_report(95, rl_update=20.0)))

  def no_compile(*args, **kwargs):
    raise AssertionError("compiled again")

  monkeypatch.setattr(memory_plan.subprocess, "run", no_compile)
  assert memory_plan._compile("m7", "v5p:2x2x4", tmp_path, []) == _report(95, rl_update=20.0)
