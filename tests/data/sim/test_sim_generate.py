"""Writing demo trees: byte-for-byte determinism, idempotent re-runs, the RLBench layout, errors."""

from __future__ import annotations

import pathlib
import shutil

import numpy as np
import pytest

pytest.importorskip("pybullet")

# pylint: disable=wrong-import-position
from robot_r1_jax.data import rlbench_io
from robot_r1_jax.data.sim import TASKS as TASK_CLASSES
from robot_r1_jax.data.sim import RenderConfig, Summary, episode_dir, generate, task_names

SMALL = RenderConfig(image_size=32)  # Both cameras.
TASKS = ["reach_target", "push_button"]


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("determinism_a")
  assert generate(root, TASKS, 1, seed=7, config=SMALL, progress=False) == Summary(1 * 2, 0)
  return root


def test_same_seed_writes_identical_bytes(tree, tmp_path):
  # Another run, tasks in the other order (so the simulator has run other episodes first).
  generate(tmp_path, TASKS[::-1], 1, seed=7, config=SMALL, progress=False)
  first, second = _files(tree), _files(tmp_path)
  assert any(name.endswith(".png") for name in first)
  assert any(name.endswith("low_dim_obs.pkl") for name in first)
  assert first.keys() == second.keys()
  assert [name for name in first if first[name] != second[name]] == []


def test_another_seed_writes_another_episode(tree, tmp_path):
  generate(tmp_path, TASKS[:1], 1, seed=8, config=SMALL, progress=False)
  name = "reach_target/variation0/episodes/episode0/low_dim_obs.pkl"
  assert (tmp_path / name).read_bytes() != (tree / name).read_bytes()


def test_layout_reads_back_through_rlbench_io(tree):
  refs = rlbench_io.list_episodes(tree)
  assert [(r.task, r.variation, r.episode) for r in refs] == [
      ("push_button", 0, 0), ("reach_target", 0, 0)]
  for ref in refs:
    demo = rlbench_io.load_demo(ref.episode_dir)
    variation = rlbench_io.load_episode_variation(ref)
    assert variation.descriptions == list(TASK_CLASSES[ref.task].descriptions)
    for camera in ("front", "wrist"):
      assert len(list((ref.episode_dir / f"{camera}_rgb").glob("*.png"))) == len(demo)
      assert demo.image(len(demo) - 1, camera).shape == (32, 32, 3)
    assert demo[0].misc["front_camera_intrinsics"][0, 2] == 16.0  # Recorded for 32x32 images.


def test_rerun_skips_finished_episodes_and_fills_gaps(tree, tmp_path):
  tmp_path = pathlib.Path(shutil.copytree(tree, tmp_path / "tree"))
  before = _files(tmp_path)
  mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.pkl")}
  assert generate(tmp_path, TASKS, 1, seed=7, config=SMALL, progress=False) == Summary(0, 2)
  assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items()
             if p.name == "low_dim_obs.pkl")
  # A missing episode is written again, identical to the first time.
  victim = episode_dir(tmp_path, "reach_target", 0)
  for path in sorted(victim.rglob("*"), reverse=True):
    path.unlink() if path.is_file() else path.rmdir()
  victim.rmdir()
  assert generate(tmp_path, TASKS, 1, seed=7, config=SMALL, progress=False) == Summary(1, 1)
  assert _files(tmp_path) == before


def test_mismatched_existing_images_are_refused(tree):
  with pytest.raises(ValueError, match="--image_size=64"):
    generate(tree, TASKS, 1, seed=7, config=RenderConfig(image_size=64), progress=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tasks=["no_such_task"]), "--tasks"),
    (dict(episodes=0), "--episodes"),
    (dict(workers=0), "--workers"),
])
def test_bad_arguments_name_the_flag(tmp_path, kwargs, match):
  args = dict(tasks=["reach_target"], episodes=1, workers=1) | kwargs
  with pytest.raises(ValueError, match=match):
    generate(tmp_path, args["tasks"], args["episodes"], workers=args["workers"], progress=False)
  assert not any(tmp_path.iterdir())  # Nothing written.


def test_render_config_validates():
  with pytest.raises(ValueError, match="image_size"):
    RenderConfig(image_size=8)
  with pytest.raises(ValueError, match="cameras"):
    RenderConfig(cameras=("overhead",))


def test_every_task_writes_a_readable_episode(demo_tree):
  for task in task_names():
    demo = rlbench_io.load_demo(episode_dir(demo_tree, task, 0))
    assert len(demo) >= 12
    image = demo.image(0)
    assert image.shape == (32, 32, 3) and len(np.unique(image.reshape(-1, 3), axis=0)) > 5
