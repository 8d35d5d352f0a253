"""Ablation sweep: SFT baselines and RL algorithms from the same SFT checkpoint, over seeds.

python bench/sweep.py --out sweep --seeds 0,1,2 [--algos grpo,rloo,reinforce_pp] [-- LAUNCH FLAGS]

For each seed: Direct-SFT and CoT-SFT runs (the baselines), then GRPO / RLOO / REINFORCE++ each
initialised from the Direct-SFT checkpoint, every run evaluated greedily on the val split. Writes
`OUT/results.json`, `OUT/table.md` (accuracy per question type, mean ± spread over seeds) and
`OUT/comparison.png`, and prints, per RL method and question type, whether its mean accuracy beats
the Direct-SFT checkpoint it started from by more than the seed-to-seed spread. Runs are `python -m robot_r1_jax.launch` subprocesses sharing one data folder
(`OUT/data`); finished runs are reused, so an interrupted sweep resumes. Flags after `--` go to
every run (e.g. `--model=small --sft_steps=200 --max_steps=40`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

TYPES = ("waypoint", "current_state", "movement", "all")


def _launch(*flags: str) -> None:
  subprocess.run([sys.executable, "-m", "robot_r1_jax.launch", *flags], check=True)


def _accuracy(eval_json: pathlib.Path) -> dict[str, float]:
  result = json.loads(eval_json.read_text())
  by_type = {t: m["accuracy"] for t, m in result["by_type"].items()}
  return {t: by_type.get(t, result["overall"]["accuracy"] if t == "all" else None)
          for t in TYPES}


def run_seed(out: pathlib.Path, seed: int, algos: list[str], extra: list[str]) -> dict:
  data = out / "data"
  common = [f"--seed={seed}", *extra]
  if (data / "extracted" / "manifest.json").exists():
    common.append(f"--data={data / 'extracted'}")
  results = {}
  for target in ("direct", "cot"):
    run = out / f"seed{seed}" / f"sft_{target}"
    if not (run / "eval.json").exists():
      _launch("--stage=sft", f"--sft_target={target}", f"--workdir={run}", *common)
      if not any(f.startswith("--data=") for f in common):  # the first run made the data
        (run / "data").rename(data)
        common.append(f"--data={data / 'extracted'}")
      _launch("--mode=eval", f"--workdir={run}", *common)
    results[f"{target}-SFT"] = _accuracy(run / "eval.json")
  for algo in algos:
    run = out / f"seed{seed}" / algo
    if not (run / "eval.json").exists():
      _launch("--stage=rl", f"--algo={algo}", f"--init_from={out / f'seed{seed}' / 'sft_direct'}",
              f"--workdir={run}", *common)
      _launch("--mode=eval", f"--workdir={run}", *common)
    results[f"direct-SFT→{algo}"] = _accuracy(run / "eval.json")
  return results


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
      stats[method][t] = {"mean": float(mean), "spread": float(spread), "n": int(values.size)}
      cells.append(f"{100 * mean:.1f} ± {100 * spread / 2:.1f}")
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n", stats


def verdicts(stats: dict, baseline: str = "direct-SFT") -> list[str]:
  """Per RL method (`baseline→algo`) and type: the mean gain over `baseline`, and whether it exceeds
  the seed-to-seed spread (max − min over seeds, the larger of the two methods')."""
  lines = []
  for method in (m for m in stats if m.startswith(f"{baseline}→")):
    for t in TYPES:
      rl, base = stats[method][t], stats[baseline][t]
      if not (rl["n"] and base["n"]):
        continue
      gain, spread = rl["mean"] - base["mean"], max(rl["spread"], base["spread"])
      lines.append(f"{method} vs {baseline} on {t}: {100 * gain:+.1f} points, seed spread "
                   f"{100 * spread:.1f} -> {'beats' if gain > spread else 'does not beat'} it")
  return lines


def plot(stats: dict, path: pathlib.Path) -> None:
  methods = list(stats)
  fig, ax = plt.subplots(figsize=(9, 3.8))
  width = 0.8 / len(methods)
  for i, method in enumerate(methods):
    means = [100 * stats[method][t]["mean"] for t in TYPES]
    errs = [100 * stats[method][t]["spread"] / 2 for t in TYPES]
    ax.bar(np.arange(len(TYPES)) + i * width, means, width, yerr=errs, label=method, capsize=2)
  ax.set_xticks(np.arange(len(TYPES)) + width * (len(methods) - 1) / 2, TYPES)
  ax.set(ylabel="val accuracy (%)", title="SFT baselines and RL from the same SFT checkpoint")
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
  parser.add_argument("--algos", default="grpo,rloo,reinforce_pp")
  args = parser.parse_args(argv)
  per_seed = {int(s): run_seed(args.out, int(s), args.algos.split(","), extra)
              for s in args.seeds.split(",")}
  table, stats = summarise(per_seed)
  (args.out / "results.json").write_text(json.dumps({"per_seed": per_seed, "stats": stats},
                                                    indent=2) + "\n")
  lines = verdicts(stats)
  (args.out / "table.md").write_text(table + "\n" + "\n".join(lines) + "\n")
  plot(stats, args.out / "comparison.png")
  print(table)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
