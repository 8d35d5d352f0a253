"""A contact sheet of the simulator's tasks: a few front-camera frames (the start and the expert's
keyframes) and one wrist-camera frame per task, so a reader can see the scenes.

    python -m robot_r1_jax.data.sim.contact_sheet --out docs/sim_contact_sheet.png

The episodes shown are episode 0 of each task from `--seed`, i.e. exactly what
`python -m robot_r1_jax.data.sim --seed S` writes as episode0.
"""

from __future__ import annotations

import pathlib
import textwrap
from typing import Sequence

from absl import app
from absl import flags
import numpy as np
from PIL import Image, ImageDraw

from robot_r1_jax.data import atomic
from robot_r1_jax.data.rlbench_io import encode_png
from robot_r1_jax.data.sim.camera import FRONT, WRIST
from robot_r1_jax.data.sim.episode import RenderConfig, Simulator, task_names
from robot_r1_jax.data.sim.generate import record_successful

FRONT_TILES = 5
LABEL_WIDTH = 170
GAP = 4


def _pick_frames(keyframes: Sequence[int], count: int) -> list[int]:
  """Frame 0 and up to count-1 keyframes spread over the episode (always the last)."""
  if len(keyframes) <= count - 1:
    return [0, *keyframes]
  chosen = np.linspace(0, len(keyframes) - 1, count - 1).round().astype(int)
  return [0, *(keyframes[i] for i in chosen)]


def make_contact_sheet(tasks: Sequence[str] | None = None, *, seed: int = 0,
                       image_size: int = 128) -> np.ndarray:
  """The sheet as uint8 [H, W, 3]: one row per task (all tasks by default)."""
  tasks = list(tasks) if tasks is not None else task_names()
  config = RenderConfig(image_size=image_size, cameras=(FRONT, WRIST))
  tile = image_size + GAP
  sheet = Image.new("RGB", (LABEL_WIDTH + (FRONT_TILES + 1) * tile, len(tasks) * tile + 20),
                    "white")
  draw = ImageDraw.Draw(sheet)
  draw.text((LABEL_WIDTH, 4), "front camera: frame 0 and keyframes", fill="black")
  draw.text((LABEL_WIDTH + FRONT_TILES * tile, 4), "wrist camera", fill="black")
  with Simulator() as simulator:
    for row, task in enumerate(tasks):
      episode = record_successful(simulator, task, 0, seed, config)
      top = 20 + row * tile
      frames = _pick_frames(episode.keyframes, FRONT_TILES)
      for column, frame in enumerate(frames):
        sheet.paste(Image.fromarray(episode.images[FRONT][frame]),
                    (LABEL_WIDTH + column * tile, top))
      # The wrist view at the first keyframe: the gripper over its first target.
      sheet.paste(Image.fromarray(episode.images[WRIST][episode.keyframes[0]]),
                  (LABEL_WIDTH + FRONT_TILES * tile, top))
      lines = [f"{len(episode.demo)} frames", "keyframes:",
               *textwrap.wrap(", ".join(map(str, episode.keyframes)), 24)]
      draw.text((6, top + 4), task, fill="black")
      draw.multiline_text((6, top + 22), "\n".join(lines), fill="dimgray")
  return np.asarray(sheet)


# Flags exist only when run as a program, so importing `make_contact_sheet` defines none.


def _define_flags() -> None:
  flags.DEFINE_string("out", "docs/sim_contact_sheet.png", "Where to write the PNG.")
  flags.DEFINE_integer("seed", 0, "Base seed (episode 0 of each task is shown).")
  flags.DEFINE_integer("image_size", 128, "Tile size in pixels.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  values = flags.FLAGS
  sheet = make_contact_sheet(seed=values.seed, image_size=values.image_size)
  atomic.write_bytes(pathlib.Path(values.out), encode_png(sheet))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
