"""The memory plan: a recipe compiled for several models × TPU slices on this CPU host.

python bench/memory_plan.py --out /tmp/memory_plan [--models qwen2_5_vl_3b,qwen2_5_vl_7b]
    [--topologies v5e:4x4,v4:2x2x4,v5p:2x2x4,v6e:4x4] [--jobs 2] [-- LAUNCH FLAGS]

Runs `python -m robot_r1_jax.launch --compile_only` once per (model, topology), by default with the
paper recipe's flagfile, `--jobs` at a time (each compile is mostly one thread), and writes
`OUT/table.md`: peak GiB per chip for every executable of the run, its share of the chip's HBM,
and whether the whole run fits (the README's memory-plan table); then the roofline: each
executable's least time on the chip (its FLOPs at peak FLOP/s or its bytes at HBM bandwidth,
whichever is longer) and the MFU bound that follows. Each pair's report is kept at
`OUT/<model>_<topology>/compile_report.json` and reused by a later call, so an interrupted plan
resumes; `--fresh` compiles everything again. Flags after `--` go to every compile.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAPER = "robot_r1_jax/launch/configs/robot_r1_paper.cfg"
GIB = 2**30
FIT_SHARE = 0.9  # of HBM: what the runtime, fragmentation and the host's buffers leave


def _workdir(out: pathlib.Path, model: str, topology: str) -> pathlib.Path:
  return out / f"{model}_{topology.replace(':', '_')}"


def _compile(model: str, topology: str, out: pathlib.Path, flags: list[str]) -> dict | str:
  """The report of one compile, or the tail of its output when it failed."""
  workdir = _workdir(out, model, topology)
  report = workdir / "compile_report.json"
  log = workdir / "compile.log"
  if report.exists():
    return json.loads(report.read_text())
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  with open(log, "w") as f:
    proc = subprocess.run([sys.executable, "-m", "robot_r1_jax.launch", "--compile_only",
                           f"--topology={topology}", f"--model={model}", f"--workdir={workdir}",
                           *flags], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  took = time.perf_counter() - start
  print(f"{model} on {topology}: exit {proc.returncode} after {took:.0f} s ({log})", flush=True)
  # A run that does not fit exits non-zero but still writes its report.
  return json.loads(report.read_text()) if report.exists() else log.read_text()[-2000:]


def _names(reports: dict[tuple[str, str], dict | str]) -> list[str]:
  names: list[str] = []
  for r in reports.values():
    if isinstance(r, dict):
      names += [e["name"] for e in r["executables"] if e["name"] not in names]
  return names


def table(reports: dict[tuple[str, str], dict | str]) -> str:
  """One row per (model, topology): each executable's peak GiB per chip (% of HBM)."""
  names = _names(reports)
  lines = ["| model | slice (HBM/chip) | " + " | ".join(f"`{n}`" for n in names) + " | fits |",
           "|---" * (len(names) + 3) + "|"]
  for (model, topology), r in reports.items():
    if not isinstance(r, dict):
      lines.append(f"| {model} | {topology} | " + " | ".join("—" for _ in names) +
                   " | compile failed |")
      continue
    hbm = r["hbm_per_chip"]
    peaks = {e["name"]: e["peak"] for e in r["executables"]}
    cells = [f"{peaks[n] / GIB:.1f} ({100 * peaks[n] / hbm:.0f}%)" if n in peaks else "—"
             for n in names]
    worst = max(peaks.values()) / hbm
    fits = "yes" if worst <= FIT_SHARE else ("tight" if worst <= 1 else "**no**")
    lines.append(f"| {model} | {topology} ({hbm / GIB:.0f} GiB) | " + " | ".join(cells) +
                 f" | {fits} |")
  return "\n".join(lines) + "\n"


def roofline(reports: dict[tuple[str, str], dict | str]) -> str:
  """One row per (model, topology): each executable's time floor in ms (its MFU bound)."""
  names = _names(reports)
  lines = ["| model | slice | " + " | ".join(f"`{n}`" for n in names) + " |",
           "|---" * (len(names) + 2) + "|"]
  for (model, topology), r in reports.items():
    rows = {e["name"]: e for e in r["executables"]} if isinstance(r, dict) else {}
    cells = []
    for n in names:
      e = rows.get(n, {})
      cells.append("—" if e.get("floor_seconds") is None else
                   f"{1e3 * e['floor_seconds']:.3g} ({100 * e['mfu_bound']:.0f}%)")
    lines.append(f"| {model} | {topology} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main() -> None:
  argv = sys.argv[1:]
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=pathlib.Path, required=True, help="where reports are kept")
  parser.add_argument("--models", default="qwen2_5_vl_3b,qwen2_5_vl_7b",
                      help="presets or local Hugging Face directories, comma-separated")
  parser.add_argument("--topologies", default="v5e:4x4,v4:2x2x4,v5p:2x2x4,v6e:4x4",
                      help="TPU slices, comma-separated")
  parser.add_argument("--flagfile", default=PAPER, help="the recipe (default: the paper's)")
  parser.add_argument("--jobs", type=int, default=2, help="compiles at once")
  parser.add_argument("--fresh", action="store_true", help="ignore reports already in --out")
  args = parser.parse_args(argv)
  pairs = [(m, t) for m in args.models.split(",") for t in args.topologies.split(",")]
  if args.fresh:
    for m, t in pairs:
      (_workdir(args.out, m, t) / "compile_report.json").unlink(missing_ok=True)
  flags = [f"--flagfile={args.flagfile}", *extra]
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    futures = {p: pool.submit(_compile, *p, args.out, flags) for p in pairs}
    reports = {p: f.result() for p, f in futures.items()}
  text = table(reports) + "\nLeast time per run in ms (MFU at most):\n\n" + roofline(reports)
  (args.out / "table.md").write_text(text)
  print(text)
  for (m, t), r in reports.items():
    if not isinstance(r, dict):
      print(f"{m} on {t} failed:\n{r}", file=sys.stderr)


if __name__ == "__main__":
  main()
