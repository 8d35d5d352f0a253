"""Writer -> reader round trips, deterministic bytes, atomic writes, depth decoding, layouts."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from robot_r1_jax.data import rlbench_io
from robot_r1_jax.data.demo import Demo, DemoError, MissingFileError, Observation
from robot_r1_jax.data.rlbench_pickle import dump_pickle


def _full_observation(i: int) -> Observation:
  rng = np.random.default_rng(i)
  return Observation(
      joint_velocities=rng.normal(size=7), joint_positions=rng.normal(size=7),
      joint_forces=rng.normal(size=7).astype(np.float32), gripper_open=float(i % 2),
      gripper_pose=rng.normal(size=7), gripper_matrix=np.eye(4), gripper_joint_positions=np.ones(2),
      gripper_touch_forces=np.zeros(6), task_low_dim_state=np.arange(i + 1, dtype=np.int32),
      ignore_collisions=np.array(1.0),
      misc={"front_camera_near": 0.01, "front_camera_far": np.float64(4.5),
            "front_camera_intrinsics": rng.normal(size=(3, 3)), "names": ("a", "b"), "raw": b"\x00",
            "nan": float("nan")},
      extra_fields={"wrist_camera_matrix": np.eye(4)})


def _tree_files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip_is_identical(tmp_path):
  demo = Demo([_full_observation(i) for i in range(4)],
              random_seed=np.random.RandomState(3).get_state(), num_reset_attempts=1,
              extra_fields={"note": "x"})
  rng = np.random.default_rng(0)
  front = [rng.integers(0, 256, (6, 8, 3), dtype=np.uint8) for _ in range(4)]
  wrist = [rng.integers(0, 256, (5, 5, 3), dtype=np.uint8) for _ in range(4)]
  rlbench_io.save_demo(demo, tmp_path / "episode0", {"front": front, "wrist": wrist},
                       variation_number=2, descriptions=["pick up the cup"])
  loaded = rlbench_io.load_demo(tmp_path / "episode0")
  assert loaded == demo
  assert loaded.episode_dir == tmp_path / "episode0" and loaded.camera == "front"
  for i in range(4):
    np.testing.assert_array_equal(loaded.image(i), front[i])
    np.testing.assert_array_equal(loaded.image(i, camera="wrist"), wrist[i])
  np.testing.assert_array_equal(rlbench_io.load_demo(tmp_path / "episode0", "wrist").image(-1),
                                wrist[3])
  assert rlbench_io.load_variation_number(tmp_path / "episode0") == 2
  assert rlbench_io.load_variation_descriptions(tmp_path / "episode0") == ["pick up the cup"]
  # A changed value is noticed by ==.
  loaded[2].misc["front_camera_intrinsics"][0, 0] += 1e-9
  assert loaded != demo


def test_image_fields_are_none_in_the_pickle(tmp_path):
  demo = Demo([Observation(front_rgb=np.zeros((2, 2, 3)), wrist_depth=np.ones((2, 2)),
                           gripper_open=1.0)])
  rlbench_io.save_demo(demo, tmp_path)
  loaded = rlbench_io.load_demo(tmp_path)
  assert loaded[0].front_rgb is None and loaded[0].wrist_depth is None
  assert loaded[0].gripper_open == 1.0


def test_bytes_depend_only_on_values(tmp_path):
  shared = np.arange(7.0)
  # Same values, built differently: one array object shared vs fresh copies, another byte order.
  a = Demo([Observation(gripper_pose=shared, joint_velocities=shared, misc={"k": "v"})] * 3)
  b = Demo([Observation(gripper_pose=np.arange(7.0).astype(">f8"),
                        joint_velocities=np.array(list(range(7)), np.float64),
                        misc={"".join(["k"]): "".join(["v"])}) for _ in range(3)])
  images = {"front": [np.full((4, 4, 3), i, np.uint8) for i in range(3)]}
  rlbench_io.save_demo(a, tmp_path / "a", images)
  rlbench_io.save_demo(b, tmp_path / "b", {"front": [x.copy() for x in images["front"]]})
  files_a, files_b = _tree_files(tmp_path / "a"), _tree_files(tmp_path / "b")
  assert set(files_a) == {"low_dim_obs.pkl", "front_rgb/0.png", "front_rgb/1.png",
                          "front_rgb/2.png"}
  assert files_a == files_b


def test_save_is_atomic_and_validates_first(tmp_path):
  episode = tmp_path / "episode0"
  good = Demo([Observation(gripper_open=1.0)] * 2)
  rlbench_io.save_demo(good, episode, {"front": [np.zeros((2, 2, 3), np.uint8)] * 2})
  before = _tree_files(episode)
  bad_cases = [
      ({"front": [np.zeros((2, 2, 3), np.uint8)]}, "has 1 images for 2 observations"),
      ({"front": [np.zeros((2, 2), np.uint8)] * 2}, r"images\['front'\]\[0\] must be a uint8"),
      ({"front": [np.zeros((2, 2, 3), np.float32)] * 2}, "must be a uint8"),
      ({"Front/..": []}, "camera name"),
  ]
  for images, message in bad_cases:
    with pytest.raises(DemoError, match=message):
      rlbench_io.save_demo(good, episode, images)
  with pytest.raises(DemoError, match=r"observation 1 .misc\['f'\]: cannot write builtin_function"):
    rlbench_io.save_demo(Demo([Observation(), Observation(misc={"f": print})]), episode)
  assert _tree_files(episode) == before
  # Overwriting replaces the whole folder (no stale images) and leaves no temporary folders.
  rlbench_io.save_demo(Demo([Observation(gripper_open=0.0)]), episode)
  assert set(_tree_files(episode)) == {"low_dim_obs.pkl"}
  assert [p.name for p in tmp_path.iterdir()] == ["episode0"]
  # Permissions follow the umask like plain mkdir/open (not tempfile's private 0700/0600).
  rlbench_io.save_variation_descriptions(tmp_path, ["x"])
  (tmp_path / "plain_dir").mkdir()
  (tmp_path / "plain_file").write_bytes(b"")

  def mode(path: pathlib.Path) -> int:
    return path.stat().st_mode & 0o777

  assert mode(episode) == mode(tmp_path / "plain_dir")
  assert mode(tmp_path / "variation_descriptions.pkl") == mode(tmp_path / "plain_file")
  assert mode(episode / "low_dim_obs.pkl") == mode(tmp_path / "plain_file")


def test_image_errors_name_the_file(tmp_path):
  with pytest.raises(DemoError, match="not loaded from disk"):
    Demo([Observation()]).image(0)
  rlbench_io.save_demo(Demo([Observation()] * 2), tmp_path, {"front": [np.zeros((2, 2, 3),
                                                                                 np.uint8)] * 2})
  demo = rlbench_io.load_demo(tmp_path)
  with pytest.raises(MissingFileError, match=r"missing image .*wrist_rgb/0.png"):
    demo.image(0, camera="wrist")
  (tmp_path / "front_rgb" / "1.png").write_bytes(b"not a png")
  with pytest.raises(DemoError, match=r"unreadable image .*front_rgb/1.png"):
    demo.image(1)
  with pytest.raises(IndexError):
    demo.image(2)


def test_depth_encoding_matches_rlbench():
  near, far = 0.1, 3.6
  rgb = np.array([[[0, 0, 0], [255, 255, 255], [1, 0, 0], [0, 1, 2]]], np.uint8)
  scale = 2**24 - 1
  expected = near + np.array([[0, scale, 65536, 258]]) / scale * (far - near)
  np.testing.assert_allclose(rlbench_io.decode_depth(rgb, near, far), expected, rtol=1e-6)
  depth = np.random.default_rng(0).uniform(near, far, size=(16, 16))
  decoded = rlbench_io.decode_depth(rlbench_io.encode_depth(depth, near, far), near, far)
  np.testing.assert_allclose(decoded, depth, atol=(far - near) / scale + 1e-6)
  with pytest.raises(ValueError, match="uint8"):
    rlbench_io.decode_depth(np.zeros((2, 2)), near, far)


def test_list_episodes_both_layouts(tmp_path):
  one = Demo([Observation(gripper_open=1.0)])
  for k in (0, 2, 10):
    rlbench_io.save_demo(one, tmp_path / "b_task/variation0/episodes" / f"episode{k}")
  rlbench_io.save_demo(one, tmp_path / "b_task/variation12/episodes/episode1")
  rlbench_io.save_demo(one, tmp_path / "b_task/variation3/episodes/episode0")
  rlbench_io.save_variation_descriptions(tmp_path / "b_task/variation0", ["push it"])
  rlbench_io.save_demo(one, tmp_path / "a_task/all_variations/episodes/episode0",
                       variation_number=5, descriptions=["open it", "please open it"])
  (tmp_path / "a_task/all_variations/episodes/.episode1.tmp-x").mkdir()  # Skipped: not episodeK.
  (tmp_path / "a_task/notes").mkdir()
  refs = rlbench_io.list_episodes(tmp_path)
  assert [r.name for r in refs] == [
      "a_task/all_variations/episode0", "b_task/variation0/episode0",
      "b_task/variation0/episode2", "b_task/variation0/episode10", "b_task/variation3/episode0",
      "b_task/variation12/episode1"]
  assert refs[0].variation is None and refs[3].variation == 0 and refs[3].episode == 10
  assert rlbench_io.load_episode_variation(refs[0]) == rlbench_io.Variation(
      5, ["open it", "please open it"])
  assert rlbench_io.load_episode_variation(refs[1]) == rlbench_io.Variation(0, ["push it"])
  with pytest.raises(MissingFileError, match="variation3/variation_descriptions.pkl"):
    rlbench_io.load_episode_variation(refs[4])
  assert [r.task for r in rlbench_io.list_episodes(tmp_path, tasks=["b_task"])] == ["b_task"] * 5
  with pytest.raises(DemoError, match="task.* c_task not found .*available: a_task, b_task"):
    rlbench_io.list_episodes(tmp_path, tasks=["c_task"])
  with pytest.raises(MissingFileError, match="does not exist"):
    rlbench_io.list_episodes(tmp_path / "nowhere")


def test_variation_files_are_validated(tmp_path):
  with pytest.raises(DemoError, match="non-empty list of str"):
    rlbench_io.save_variation_descriptions(tmp_path, [])
  (tmp_path / "variation_descriptions.pkl").write_bytes(dump_pickle({"a": 1}))
  with pytest.raises(DemoError, match="variation_descriptions.pkl: expected a non-empty list"):
    rlbench_io.load_variation_descriptions(tmp_path)
  (tmp_path / "variation_number.pkl").write_bytes(dump_pickle(-1))
  with pytest.raises(DemoError, match="variation_number.pkl: expected a non-negative int"):
    rlbench_io.load_variation_number(tmp_path)
