"""The default job's picture: SFT loss and RL reward/accuracy curves from the runs' metrics.jsonl."""

from __future__ import annotations

import io
import json

import matplotlib
from etils import epath

from robot_r1_jax.data import atomic

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def _series(path: epath.Path, key: str) -> tuple[list[int], list[float]]:
  steps, values = [], []
  if path.exists():
    for line in path.read_text().splitlines():
      row = json.loads(line)
      if isinstance(row.get(key), (int, float)):
        steps.append(row["step"])
        values.append(row[key])
  return steps, values


def plot_curves(workdir: epath.PathLike) -> epath.Path:
  """Writes `workdir/curves.png` (SFT loss; RL reward and accuracy, with eval points)."""
  workdir = epath.Path(workdir)
  fig, (ax_sft, ax_rl) = plt.subplots(1, 2, figsize=(10, 3.6))
  ax_sft.plot(*_series(workdir / "sft" / "metrics.jsonl", "loss"), color="tab:blue")
  ax_sft.set(title="SFT warm-up", xlabel="step", ylabel="loss")
  rl = workdir / "rl" / "metrics.jsonl"
  ax_rl.plot(*_series(rl, "reward/total"), label="reward (train)", color="tab:green")
  ax_rl.plot(*_series(rl, "accuracy/all"), label="accuracy (train)", color="tab:orange")
  steps, acc = _series(rl, "eval/accuracy/all")
  if steps:
    ax_rl.plot(steps, acc, "o--", label="accuracy (val, greedy)", color="tab:red")
  ax_rl.set(title="RL", xlabel="step", ylim=(-0.05, 2.05))
  ax_rl.legend(fontsize=8)
  fig.tight_layout()
  out, png = workdir / "curves.png", io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  plt.close(fig)
  atomic.write_bytes(out, png.getvalue())
  return out
