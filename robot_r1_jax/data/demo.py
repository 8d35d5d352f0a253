"""The project's own RLBench-compatible demonstration classes: `Observation` and `Demo`.

Field names follow RLBench's current `rlbench.backend.observation.Observation`, so code written
against RLBench reads the same attributes here. Fields that older RLBench versions did not have stay
None; fields that only older versions had (e.g. `wrist_camera_matrix`) are kept in `extra_fields`.
Images are not held in memory: RLBench stores them as PNG files beside the pickle, and
`Demo.image` loads one on demand.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError


class DemoError(ValueError):
  """A demonstration on disk is unreadable, refused or inconsistent; the message names the file."""


class MissingFileError(DemoError, FileNotFoundError):
  """A file that the RLBench layout requires (pickle, image) does not exist."""


CAMERAS = ("left_shoulder", "right_shoulder", "overhead", "wrist", "front")
IMAGE_KINDS = ("rgb", "depth", "mask", "point_cloud")
# Per-camera fields that RLBench stores as files (or not at all), never inside the pickle.
IMAGE_FIELDS = tuple(f"{camera}_{kind}" for camera in CAMERAS for kind in IMAGE_KINDS)
LOW_DIM_FIELDS = ("joint_velocities", "joint_positions", "joint_forces", "gripper_open",
                  "gripper_pose", "gripper_matrix", "gripper_joint_positions",
                  "gripper_touch_forces", "task_low_dim_state", "ignore_collisions", "misc")
# RLBench's constructor order; the writer emits attributes in this order so bytes are stable.
OBSERVATION_FIELDS = IMAGE_FIELDS + LOW_DIM_FIELDS


@dataclasses.dataclass(eq=False)
class Observation:
  """One time step, with RLBench's field names. Every field defaults to None."""

  left_shoulder_rgb: np.ndarray | None = None
  left_shoulder_depth: np.ndarray | None = None
  left_shoulder_mask: np.ndarray | None = None
  left_shoulder_point_cloud: np.ndarray | None = None
  right_shoulder_rgb: np.ndarray | None = None
  right_shoulder_depth: np.ndarray | None = None
  right_shoulder_mask: np.ndarray | None = None
  right_shoulder_point_cloud: np.ndarray | None = None
  overhead_rgb: np.ndarray | None = None
  overhead_depth: np.ndarray | None = None
  overhead_mask: np.ndarray | None = None
  overhead_point_cloud: np.ndarray | None = None
  wrist_rgb: np.ndarray | None = None
  wrist_depth: np.ndarray | None = None
  wrist_mask: np.ndarray | None = None
  wrist_point_cloud: np.ndarray | None = None
  front_rgb: np.ndarray | None = None
  front_depth: np.ndarray | None = None
  front_mask: np.ndarray | None = None
  front_point_cloud: np.ndarray | None = None
  joint_velocities: np.ndarray | None = None  # (7,)
  joint_positions: np.ndarray | None = None  # (7,)
  joint_forces: np.ndarray | None = None  # (7,)
  gripper_open: float | None = None  # 1.0 open, 0.0 closed
  gripper_pose: np.ndarray | None = None  # (7,) = x, y, z, qx, qy, qz, qw
  gripper_matrix: np.ndarray | None = None  # (4, 4)
  gripper_joint_positions: np.ndarray | None = None
  gripper_touch_forces: np.ndarray | None = None
  task_low_dim_state: np.ndarray | None = None
  ignore_collisions: np.ndarray | None = None
  misc: dict[str, Any] | None = None  # camera extrinsics/intrinsics/near/far, …
  # Attributes of older or forked RLBench versions that have no field here, kept for round trips.
  extra_fields: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, Observation):
      return NotImplemented
    return all(values_equal(getattr(self, f.name), getattr(other, f.name))
               for f in dataclasses.fields(self))

  __hash__ = None  # Mutable, compared by value.


@dataclasses.dataclass(eq=False)
class Demo:
  """An episode: a list of observations plus RLBench's bookkeeping, with lazy image access.

  `episode_dir` and `camera` are set by `rlbench_io.load_demo` and tell `image()` where the PNG
  files are; they are not part of the pickle and not compared by `==`.
  """

  observations: list[Observation]
  random_seed: object = None  # np.random.get_state() tuple when RLBench recorded the demo.
  num_reset_attempts: int | None = None
  extra_fields: dict[str, Any] = dataclasses.field(default_factory=dict)
  episode_dir: pathlib.Path | None = None
  camera: str = "front"

  def __len__(self) -> int:
    return len(self.observations)

  def __getitem__(self, i: int) -> Observation:
    return self.observations[i]

  def __iter__(self) -> Iterator[Observation]:
    return iter(self.observations)

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, Demo):
      return NotImplemented
    return (values_equal(self.observations, other.observations)
            and values_equal(self.random_seed, other.random_seed)
            and values_equal(self.num_reset_attempts, other.num_reset_attempts)
            and values_equal(self.extra_fields, other.extra_fields))

  __hash__ = None

  def image_path(self, i: int, camera: str | None = None) -> pathlib.Path:
    """`<episode_dir>/<camera>_rgb/<i>.png`, RLBench's image location for step i."""
    if self.episode_dir is None:
      raise DemoError("this Demo was not loaded from disk (episode_dir is None), so it has no "
                      "images; load it with rlbench_io.load_demo")
    if not -len(self) <= i < len(self):
      raise IndexError(f"step {i} is outside the demo's {len(self)} steps ({self.episode_dir})")
    return self.episode_dir / f"{camera or self.camera}_rgb" / f"{i % len(self)}.png"

  def image(self, i: int, camera: str | None = None) -> np.ndarray:
    """The RGB image of step i from `camera` (default: the demo's camera) as uint8 [H, W, 3]."""
    return read_rgb(self.image_path(i, camera))


def read_rgb(path: pathlib.Path) -> np.ndarray:
  """Reads an image file as uint8 [H, W, 3]; errors name the file."""
  if not path.is_file():
    raise MissingFileError(f"missing image {path}")
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"), dtype=np.uint8)
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise DemoError(f"unreadable image {path}: {e}") from e


def values_equal(a: Any, b: Any) -> bool:
  """Structural equality for demo data: arrays by dtype, shape and values (NaN equals NaN)."""
  if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
      return False
    if a.dtype != b.dtype or a.shape != b.shape:
      return False
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
  if type(a) is not type(b):
    return False
  if isinstance(a, dict):
    return a.keys() == b.keys() and all(values_equal(a[k], b[k]) for k in a)
  if isinstance(a, (list, tuple)):
    return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b))
  if isinstance(a, (Observation, Demo)):
    return a == b
  if isinstance(a, (float, np.floating)) and math.isnan(a):
    return math.isnan(b)
  return bool(a == b)
