"""RLBench's on-disk demo format: safe reading, writing, depth decoding and the folder layouts.

Layouts (both are read; `list_episodes` enumerates them)::

    <root>/<task>/variation<N>/variation_descriptions.pkl       list[str]
    <root>/<task>/variation<N>/episodes/episode<K>/low_dim_obs.pkl
    <root>/<task>/variation<N>/episodes/episode<K>/<camera>_rgb/<i>.png
    <root>/<task>/all_variations/episodes/episode<K>/{low_dim_obs, variation_descriptions,
                                                      variation_number}.pkl + images

Pickles are read only through the allow-list in `rlbench_pickle`; a refused global raises
`UnsafePickleError` naming the global and the file. Writes are atomic and byte-deterministic.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
import re
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from robot_r1_jax.data import atomic
from robot_r1_jax.data.demo import Demo, DemoError, MissingFileError, Observation, read_rgb
from robot_r1_jax.data.rlbench_pickle import (UnsafePickleError, demo_from_pickle, describe,
                                              dump_demo, dump_pickle, load_pickle)

__all__ = ["Demo", "DemoError", "EpisodeRef", "MissingFileError", "Observation",
           "UnsafePickleError", "Variation", "decode_depth", "encode_depth", "encode_png",
           "list_episodes", "load_demo", "load_episode_variation", "load_variation_descriptions",
           "load_variation_number", "read_rgb", "save_demo", "save_variation_descriptions",
           "task_instruction"]

LOW_DIM_PICKLE = "low_dim_obs.pkl"
VARIATION_DESCRIPTIONS = "variation_descriptions.pkl"
VARIATION_NUMBER = "variation_number.pkl"
ALL_VARIATIONS = "all_variations"
DEPTH_SCALE = 2**24 - 1  # RLBench packs normalised depth into 24 bits across R, G, B.

_VARIATION_RE = re.compile(r"variation(\d+)")
_EPISODE_RE = re.compile(r"episode(\d+)")
_CAMERA_RE = re.compile(r"[a-z][a-z0-9_]*")


def load_demo(episode_dir: str | pathlib.Path, camera: str = "front") -> Demo:
  """Reads `<episode_dir>/low_dim_obs.pkl`; `camera` is the default for `Demo.image`."""
  episode_dir = pathlib.Path(episode_dir)
  _check_camera(camera)
  pickle_path = episode_dir / LOW_DIM_PICKLE
  demo = demo_from_pickle(load_pickle(pickle_path), pickle_path)
  return dataclasses.replace(demo, episode_dir=episode_dir, camera=camera)


def save_demo(demo: Demo, episode_dir: str | pathlib.Path,
              images: Mapping[str, Sequence[np.ndarray]] | None = None, *,
              variation_number: int | None = None,
              descriptions: Sequence[str] | None = None) -> None:
  """Writes an episode folder in RLBench's format, atomically (the folder appears complete or not).

  Args:
    demo: the observations; image fields are written as None in the pickle, as RLBench does.
    episode_dir: `.../episodes/episode<K>`; replaced if it exists.
    images: camera name ("front", "wrist", …) -> one uint8 [H, W, 3] image per observation, written
      as `<camera>_rgb/<i>.png`.
    variation_number: written as `variation_number.pkl` (the all_variations layout).
    descriptions: written as `variation_descriptions.pkl` in the episode (all_variations layout).
  """
  images = dict(images or {})
  for camera, frames in images.items():
    _check_camera(camera)
    if len(frames) != len(demo):
      raise DemoError(f"images[{camera!r}] has {len(frames)} images for {len(demo)} observations")
    for i, frame in enumerate(frames):
      if (not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3
          or frame.shape[-1] != 3):
        raise DemoError(f"images[{camera!r}][{i}] must be a uint8 [H, W, 3] array, got "
                        f"{getattr(frame, 'dtype', type(frame).__name__)} "
                        f"{getattr(frame, 'shape', '')}")
  low_dim = dump_demo(demo)  # Validates before anything touches the disk.
  with atomic.directory(pathlib.Path(episode_dir)) as tmp:
    (tmp / LOW_DIM_PICKLE).write_bytes(low_dim)
    for camera, frames in images.items():
      folder = tmp / f"{camera}_rgb"
      folder.mkdir()
      for i, frame in enumerate(frames):
        (folder / f"{i}.png").write_bytes(encode_png(frame))
    if variation_number is not None:
      (tmp / VARIATION_NUMBER).write_bytes(dump_pickle(int(variation_number)))
    if descriptions is not None:
      (tmp / VARIATION_DESCRIPTIONS).write_bytes(dump_pickle(_check_descriptions(
          list(descriptions), tmp / VARIATION_DESCRIPTIONS)))


def encode_png(image: np.ndarray) -> bytes:
  """PNG bytes of a uint8 [H, W, 3] image; Pillow's encoder is deterministic for fixed settings."""
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
  return buffer.getvalue()


def save_variation_descriptions(variation_dir: str | pathlib.Path,
                                descriptions: Sequence[str]) -> None:
  """Writes `<variation_dir>/variation_descriptions.pkl` (a pickled list of str), atomically."""
  path = pathlib.Path(variation_dir) / VARIATION_DESCRIPTIONS
  atomic.write_bytes(path, dump_pickle(_check_descriptions(list(descriptions), path)))


def load_variation_descriptions(variation_dir: str | pathlib.Path) -> list[str]:
  """Reads `<variation_dir>/variation_descriptions.pkl` (also found in all_variations episodes)."""
  path = pathlib.Path(variation_dir) / VARIATION_DESCRIPTIONS
  return _check_descriptions(load_pickle(path), path)


def load_variation_number(episode_dir: str | pathlib.Path) -> int:
  """Reads `<episode_dir>/variation_number.pkl` (the all_variations layout)."""
  path = pathlib.Path(episode_dir) / VARIATION_NUMBER
  value = load_pickle(path)
  if isinstance(value, np.integer):
    value = int(value)
  if not isinstance(value, int) or isinstance(value, bool) or value < 0:
    raise DemoError(f"{path}: expected a non-negative int, found {value!r}")
  return value


def _check_descriptions(value: object, path: pathlib.Path) -> list[str]:
  if not isinstance(value, list) or not value or not all(isinstance(d, str) for d in value):
    found = "an empty list" if value == [] else describe(value)
    raise DemoError(f"{path}: expected a non-empty list of str, found {found}")
  return value


def _check_camera(camera: str) -> None:
  if not isinstance(camera, str) or not _CAMERA_RE.fullmatch(camera):
    raise DemoError(f"camera name {camera!r} must be lower-case letters, digits and _ (e.g. "
                    "'front', 'wrist')")


# ------------------------------------------------------------------------------------------------
# Depth.


def encode_depth(depth: np.ndarray, near: float, far: float) -> np.ndarray:
  """Metres -> RLBench's 24-bit RGB depth image (uint8 [H, W, 3]), clipped to [near, far]."""
  normalised = np.clip((np.asarray(depth, np.float64) - near) / (far - near), 0.0, 1.0)
  packed = np.floor(normalised * DEPTH_SCALE + 0.5).astype(np.uint32)
  return np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], axis=-1).astype(np.uint8)


def decode_depth(rgb: np.ndarray, near: float, far: float) -> np.ndarray:
  """RLBench's 24-bit RGB depth image -> metres (float32 [H, W]).

  `near`/`far` are the camera's clipping planes, stored per step in
  `obs.misc['<camera>_camera_near']` / `['<camera>_camera_far']`.
  """
  rgb = np.asarray(rgb)
  if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
    raise ValueError(f"depth image must be uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
  packed = rgb.astype(np.int64) @ np.array([65536, 256, 1], np.int64)
  return (near + packed / DEPTH_SCALE * (far - near)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Layout.


@dataclasses.dataclass(frozen=True)
class EpisodeRef:
  """One episode folder of a demo tree."""

  task: str
  variation_dir: pathlib.Path  # .../<task>/variation<N> or .../<task>/all_variations
  episode_dir: pathlib.Path
  episode: int  # K of episode<K>
  variation: int | None  # N; None under all_variations (see the episode's variation_number.pkl).

  @property
  def name(self) -> str:
    """A stable id, e.g. 'pick_up_cup/variation0/episode3'."""
    return f"{self.task}/{self.variation_dir.name}/episode{self.episode}"

  @property
  def descriptions_path(self) -> pathlib.Path:
    """The variation's `variation_descriptions.pkl`: one per variation folder, or the episode's own
    under all_variations."""
    folder = self.variation_dir if self.variation is not None else self.episode_dir
    return folder / VARIATION_DESCRIPTIONS

  def variation_number(self) -> int:
    """N of variation<N>, or the episode's `variation_number.pkl` under all_variations."""
    return self.variation if self.variation is not None else load_variation_number(
        self.episode_dir)


@dataclasses.dataclass(frozen=True)
class Variation:
  number: int
  descriptions: list[str]


def load_episode_variation(ref: EpisodeRef) -> Variation:
  """The episode's variation number and task descriptions, from whichever layout it is in."""
  return Variation(ref.variation_number(), load_variation_descriptions(ref.descriptions_path.parent))


def task_instruction(task: str) -> str:
  """An instruction made from a task folder's name (`reach_target` -> "reach target"), for
  variations whose descriptions file cannot be used."""
  return " ".join(task.replace("_", " ").split())


def list_episodes(root: str | pathlib.Path, tasks: Sequence[str] | None = None) -> list[EpisodeRef]:
  """Every episode under `root`, sorted by task, variation number (all_variations last), episode.

  Args:
    root: the folder holding one folder per task.
    tasks: restrict to these task names; each must exist under `root`.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise MissingFileError(f"demo folder {root} does not exist")
  available = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
  if tasks is not None:
    unknown = sorted(set(tasks) - set(available))
    if unknown:
      raise DemoError(f"task(s) {', '.join(unknown)} not found under {root} (available: "
                      f"{', '.join(available) or 'none'})")
    available = sorted(set(tasks))
  refs = []
  for task in available:
    for variation_dir in sorted((root / task).iterdir()):
      match = _VARIATION_RE.fullmatch(variation_dir.name)
      if not (match or variation_dir.name == ALL_VARIATIONS) or not variation_dir.is_dir():
        continue
      episodes_dir = variation_dir / "episodes"
      if not episodes_dir.is_dir():
        continue
      for episode_dir in episodes_dir.iterdir():
        episode = _EPISODE_RE.fullmatch(episode_dir.name)
        if episode and episode_dir.is_dir():
          refs.append(EpisodeRef(task=task, variation_dir=variation_dir, episode_dir=episode_dir,
                                 episode=int(episode.group(1)),
                                 variation=int(match.group(1)) if match else None))
  refs.sort(key=lambda r: (r.task, r.variation is None, r.variation or 0, r.episode))
  return refs
