"""Ablation sweep: SFT baselines and RL algorithms from the same SFT checkpoint, over seeds.

python bench/sweep.py --out sweep --seeds 0,1,2 [--algos grpo,rloo,reinforce_pp]
    [--arms NAME=FLAGFILE,...] [--sft_targets direct,cot,check] [--rl_from direct] [--sft_seed N]
    [--rl_data DIR] [--test_data DIR] [-- LAUNCH FLAGS]

For each seed: one SFT run per target (the baselines), then one RL run per arm, each initialised
from the `--rl_from` SFT checkpoint, every run evaluated greedily on the val split. An arm is an
`--algos` name (the launch flags with `--algo=NAME`) or a `--arms NAME=FLAGFILE` (the launch flags,
then the flagfile's, which win: e.g. `gspo=objectives/gspo.cfg`; a flagfile path is resolved as
the launcher resolves it, from the working directory, then among the packaged configs).
`--sft_seed N` trains each SFT target once, with seed N, and starts every seed's RL runs from that
one checkpoint: the spread is then the RL runs' own, over the same start. `--rl_data DIR` trains
the RL runs on another extraction (e.g. `--question_types=movement` of the same demos); every run is
still evaluated on the `--data` val split. `--test_data DIR` also evaluates every run on DIR's val split
(`RUN/test/eval.json`; e.g. fresh episodes extracted with `--val_fraction 0.99`, all of them val)
and reports that instead: a larger, never-tuned-on test set, added to finished runs without
retraining them. Writes
`OUT/results.json`, `OUT/table.md` (accuracy per question type, mean ± half the spread over seeds)
and `OUT/comparison.png`, and prints, per RL method and question type, whether its mean accuracy
beats the SFT checkpoint it started from by more than the seed-to-seed spread, with the questions
each seed's RL run answers right that its start got wrong, and the reverse. Runs are
`python -m robot_r1_jax.launch` subprocesses sharing one data folder (`OUT/data`); finished runs
are reused, so an interrupted sweep resumes. The RL runs come first, the other baselines last.
Flags after `--` go to every run (e.g. `--model=small --sft_steps=200 --max_steps=40`). SFT runs on
reasoning targets (cot, check) are evaluated with `--max_new_tokens=<--reasoning_tokens>`; RL runs
sample and are evaluated with the `--max_new_tokens` given after `--`, which must then fit their
start's completions (e.g. 160 for check targets).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

TYPES = ("waypoint", "current_state", "movement", "all")
ONE_ANSWER = 0.95  # a top-answer share from which a type's accuracy is a constant's, not learning


def _launch(*flags: str) -> None:
  subprocess.run([sys.executable, "-m", "robot_r1_jax.launch", *flags], check=True)


def _paired(start_json: pathlib.Path, run_json: pathlib.Path) -> dict[str, list[int]] | None:
  """Per type: [questions the run answers right that its start got wrong, the reverse], matched by
  record index; None when either evaluation lacks indexed records (older eval.json files)."""
  start, run = (json.loads(f.read_text()).get("records", []) for f in (start_json, run_json))
  before = {r.get("record_index"): r["correct"] for r in start}
  if not run or None in before or any(r.get("record_index") not in before for r in run):
    return None
  counts = {t: [0, 0] for t in TYPES}
  for r in run:
    if r["correct"] is not None and r["correct"] != before[r["record_index"]]:
      for t in (r["question_type"], "all"):
        counts[t][0 if r["correct"] else 1] += 1
  return counts


def _accuracy(eval_json: pathlib.Path) -> dict[str, Any]:
  """Accuracy per type, and under "one_answer" the types answered (nearly) always the same way."""
  result = json.loads(eval_json.read_text())
  metrics = {**result["by_type"], "all": result["overall"]}
  return {**{t: metrics[t]["accuracy"] if t in metrics else None for t in TYPES},
          "one_answer": [t for t in TYPES if t in metrics and
                         metrics[t].get("top_answer_share", 0.0) >= ONE_ANSWER]}


class Sweep:
  """The sweep's runs, each made once (resumable) and evaluated."""

  def __init__(self, out: pathlib.Path, extra: list[str], *, sft_seed: int | None,
               reasoning_tokens: int, rl_data: pathlib.Path | None = None,
               test_data: pathlib.Path | None = None):
    self.out, self.extra, self.sft_seed = out, extra, sft_seed
    self.reasoning_tokens, self.rl_data, self.test_data = reasoning_tokens, rl_data, test_data
    self.data = out / "data"

  def _common(self, seed: int) -> list[str]:
    common = [f"--seed={seed}", *self.extra]
    if (self.data / "extracted" / "manifest.json").exists():
      common.append(f"--data={self.data / 'extracted'}")
    return common

  def sft_run(self, target: str, seed: int) -> pathlib.Path:
    seed = seed if self.sft_seed is None else self.sft_seed
    run = self.out / f"seed{seed}" / f"sft_{target}"
    budget = [] if target == "direct" else [f"--max_new_tokens={self.reasoning_tokens}"]
    if not (run / "eval.json").exists():
      common = self._common(seed)
      _launch("--stage=sft", f"--sft_target={target}", f"--workdir={run}", *common)
      if not any(f.startswith("--data=") for f in common):  # the first run made the data
        (run / "data").rename(self.data)
        common.append(f"--data={self.data / 'extracted'}")
      _launch("--mode=eval", f"--workdir={run}", *common, *budget)
    self._test(run, seed, budget)
    return run

  def rl_run(self, arm: str, flags: list[str], seed: int, init_from: pathlib.Path
             ) -> pathlib.Path:
    run = self.out / f"seed{seed}" / f"{init_from.name}-{arm}"
    if not (run / "eval.json").exists():
      common = self._common(seed)
      train_data = [f"--data={self.rl_data}"] if self.rl_data else []  # the last flag wins
      _launch("--stage=rl", f"--init_from={init_from}", f"--workdir={run}", *common, *flags,
              *train_data)
      _launch("--mode=eval", f"--workdir={run}", *common)
    self._test(run, seed, [])
    return run

  def _test(self, run: pathlib.Path, seed: int, budget: list[str]) -> None:
    if self.test_data and not (run / "test" / "eval.json").exists():
      _launch("--mode=eval", f"--init_from={run}", f"--workdir={run / 'test'}",
              *self._common(seed), *budget, f"--data={self.test_data}")  # the last flag wins

  def eval_json(self, run: pathlib.Path) -> pathlib.Path:
    """The evaluation a run is reported by: --test_data's when given, else --data's val split."""
    return run / "test" / "eval.json" if self.test_data else run / "eval.json"


def arms(algos: str, flagfiles: str) -> dict[str, list[str]]:
  """Arm name -> the flags its RL runs add: `--algos` names, then `--arms NAME=FLAGFILE` pairs."""
  out = {algo: [f"--algo={algo}"] for algo in algos.split(",") if algo}
  for pair in (p for p in flagfiles.split(",") if p):
    name, sep, path = pair.partition("=")
    if not (sep and name and path):
      raise SystemExit(f"--arms: {pair!r} is not NAME=FLAGFILE")
    if name in out:
      raise SystemExit(f"--arms: arm {name!r} is named twice")
    out[name] = [f"--flagfile={path}"]
  return out


def run_sweep(sweep: Sweep, seeds: list[int], rl_arms: dict[str, list[str]], targets: list[str],
              rl_from: str) -> dict[int, dict]:
  """{seed: {method: accuracy per type}}; methods are "<target>-SFT" and "<rl_from>-SFT→<arm>"."""
  per_seed = {}
  for seed in seeds:
    start = sweep.sft_run(rl_from, seed)
    per_seed[seed] = {f"{rl_from}-SFT": _accuracy(sweep.eval_json(start))}
    for arm, flags in rl_arms.items():
      run = sweep.eval_json(sweep.rl_run(arm, flags, seed, start))
      per_seed[seed][f"{rl_from}-SFT→{arm}"] = {
          **_accuracy(run), "paired": _paired(sweep.eval_json(start), run)}
  for seed in seeds:
    for target in (t for t in targets if t != rl_from):
      per_seed[seed][f"{target}-SFT"] = _accuracy(sweep.eval_json(sweep.sft_run(target, seed)))
  return per_seed


def summarise(per_seed: dict[int, dict]) -> tuple[str, dict]:
  methods = list(next(iter(per_seed.values())))
  stats, lines = {}, ["| method | " + " | ".join(TYPES) + " |",
                      "|---|" + "---|" * len(TYPES)]
  for method in methods:
    cells, stats[method] = [], {}
    for t in TYPES:
      values = np.array([per_seed[s][method][t] for s in per_seed
                         if per_seed[s][method][t] is not None], float)
      mean, spread = (values.mean(), values.max() - values.min()) if values.size else (np.nan, 0)
      stats[method][t] = {"mean": float(mean), "spread": float(spread), "n": int(values.size),
                          "one_answer": all(t in per_seed[s][method].get("one_answer", ())
                                            for s in per_seed)}
      paired = [per_seed[s][method].get("paired") for s in per_seed]
      if paired and all(paired):  # [fixed, broken] per seed, against the checkpoint RL started from
        stats[method][t]["paired"] = [p[t] for p in paired]
      cells.append(f"{100 * mean:.1f} ± {100 * spread / 2:.1f}" if values.size else "–")
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n", stats


def verdicts(stats: dict, baseline: str) -> list[str]:
  """Per RL method (`baseline→algo`) and type: the mean gain over `baseline`, and whether it exceeds
  the seed-to-seed spread (max − min over seeds, the larger of the two methods'). A gain made by
  giving one answer to ≥ 95% of the questions on every seed is called a constant, not a win. Where
  the evaluations hold indexed records, each seed's questions fixed / broken against its start
  follow (a gain spread over many questions, or a few flips on a small split)."""
  lines = []
  for method in (m for m in stats if m.startswith(f"{baseline}→")):
    for t in TYPES:
      rl, base = stats[method][t], stats[baseline][t]
      if not (rl["n"] and base["n"]):
        continue
      gain, spread = rl["mean"] - base["mean"], max(rl["spread"], base["spread"])
      verdict = "does not beat it"
      if gain > spread:
        verdict = (f"beats it only by giving one answer to >= {ONE_ANSWER:.0%} of the questions "
                   "on every seed (a constant)"
                   if rl["one_answer"] else "beats it")
      pairs = rl.get("paired")
      paired = (f"; per seed it fixes / breaks {' '.join(f'{f}/{b}' for f, b in pairs)} questions"
                if pairs else "")
      lines.append(f"{method} vs {baseline} on {t}: {100 * gain:+.1f} points, seed spread "
                   f"{100 * spread:.1f} -> {verdict}{paired}")
  return lines


def plot(stats: dict, path: pathlib.Path, split: str) -> None:
  methods = list(stats)
  fig, ax = plt.subplots(figsize=(9, 3.8))
  width = 0.8 / len(methods)
  for i, method in enumerate(methods):
    means = [100 * stats[method][t]["mean"] for t in TYPES]
    errs = [100 * stats[method][t]["spread"] / 2 for t in TYPES]
    ax.bar(np.arange(len(TYPES)) + i * width, means, width, yerr=errs, label=method, capsize=2)
  ax.set_xticks(np.arange(len(TYPES)) + width * (len(methods) - 1) / 2, TYPES)
  ax.set(ylabel=f"{split} accuracy (%)", title="SFT baselines and RL from the same SFT checkpoint")
  ax.legend(fontsize=7, ncols=2)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main() -> None:
  argv = sys.argv[1:]
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("sweep"))
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--algos", default="grpo,rloo,reinforce_pp",
                      help="RL arms by advantage estimator (empty: none)")
  parser.add_argument("--arms", default="",
                      help="more RL arms, NAME=FLAGFILE,... (the flagfile's flags win)")
  parser.add_argument("--sft_targets", default="direct,cot,check",
                      help="SFT baselines (launch --sft_target values)")
  parser.add_argument("--rl_from", default="direct", help="the SFT target RL starts from")
  parser.add_argument("--sft_seed", type=int, default=None,
                      help="train each SFT target once, with this seed (default: once per seed)")
  parser.add_argument("--reasoning_tokens", type=int, default=256,
                      help="--max_new_tokens when evaluating cot / check SFT runs")
  parser.add_argument("--rl_data", type=pathlib.Path, default=None,
                      help="extracted questions for the RL runs (default: the runs' --data)")
  parser.add_argument("--test_data", type=pathlib.Path, default=None,
                      help="also evaluate every run on this extraction's val split, and report "
                           "that (default: report --data's val split)")
  args = parser.parse_args(argv)
  sweep = Sweep(args.out, extra, sft_seed=args.sft_seed, reasoning_tokens=args.reasoning_tokens,
                rl_data=args.rl_data, test_data=args.test_data)
  per_seed = run_sweep(sweep, [int(s) for s in args.seeds.split(",")],
                       arms(args.algos, args.arms), args.sft_targets.split(","), args.rl_from)
  table, stats = summarise(per_seed)
  (args.out / "results.json").write_text(json.dumps({"per_seed": per_seed, "stats": stats},
                                                    indent=2) + "\n")
  lines = verdicts(stats, f"{args.rl_from}-SFT")
  (args.out / "table.md").write_text(table + "\n" + "\n".join(lines) + "\n")
  plot(stats, args.out / "comparison.png", "test" if args.test_data else "val")
  print(table)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
