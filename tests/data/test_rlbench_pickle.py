"""The allow-list unpickler refuses hostile pickles without running them, and reads RLBench's."""

from __future__ import annotations

import os
import pathlib
import pickle
import subprocess

import numpy as np
import pytest

from robot_r1_jax.data import rlbench_io
from robot_r1_jax.data.demo import DemoError, MissingFileError
from robot_r1_jax.data.rlbench_pickle import UnsafePickleError, dump_pickle, load_pickle


class _Reduces:
  """Pickles as a call of `func(*args)`: what a hostile pickle stream does."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


def _hostile_pickles(marker: pathlib.Path) -> dict[str, tuple[bytes, str]]:
  """name -> (pickle bytes, the global the reader must name). Each would create `marker`."""
  touch = f"touch {marker}"
  return {
      # os.system pickles as posix.system on Linux; write the os spelling by hand (protocol 0).
      "os.system": (f"cos\nsystem\n(V{touch}\ntR.".encode(), "os.system"),
      "posix.system": (pickle.dumps(_Reduces(os.system, touch)), "posix.system"),
      "subprocess.Popen": (pickle.dumps(_Reduces(subprocess.Popen, ["touch", str(marker)])),
                           "subprocess.Popen"),
      "builtins.eval": (pickle.dumps(
          _Reduces(eval, f"__import__('pathlib').Path({str(marker)!r}).touch()")), "builtins.eval"),
      # The dangerous call is an argument of another call, deep inside allowed-looking data.
      "nested": (pickle.dumps({"misc": [(1, _Reduces(print, _Reduces(os.system, touch)))]}),
                 "builtins.print"),
      "getattr_import": (pickle.dumps(_Reduces(getattr, _Reduces(__import__, "os"), "system")),
                         "builtins.getattr"),
  }


@pytest.mark.parametrize("name", ["os.system", "posix.system", "subprocess.Popen",
                                  "builtins.eval", "nested", "getattr_import"])
def test_hostile_pickle_is_refused_without_side_effect(tmp_path, name):
  marker = tmp_path / "pwned"
  data, refused = _hostile_pickles(marker)[name]
  episode = tmp_path / "episode0"
  episode.mkdir()
  (episode / "low_dim_obs.pkl").write_bytes(data)
  with pytest.raises(UnsafePickleError) as info:
    rlbench_io.load_demo(episode)
  message = str(info.value)
  assert f"refused global {refused}" in message
  assert str(episode / "low_dim_obs.pkl") in message
  assert not marker.exists()
  # The test's own sanity check: plain pickle would have run it. (Popen would outlive the test and
  # getattr_import only returns the function, so those two are not run.)
  if name in ("os.system", "posix.system", "builtins.eval", "nested"):
    pickle.loads(data)
    assert marker.exists()


def test_hostile_global_inside_an_rlbench_demo_is_refused(tmp_path, run_with_rlbench):
  marker = tmp_path / "pwned"
  path = tmp_path / "low_dim_obs.pkl"
  run_with_rlbench(f"""
      import os, pickle
      from rlbench.demo import Demo
      from rlbench.backend.observation import Observation
      class Evil:
        def __reduce__(self):
          return os.system, ("touch {marker}",)
      demo = Demo([Observation(gripper_open=1.0, misc={{"k": [Evil()]}})])
      with open({str(path)!r}, "wb") as f:
        pickle.dump(demo, f)
      """)
  with pytest.raises(UnsafePickleError, match="refused global posix.system"):
    rlbench_io.load_demo(tmp_path)
  assert not marker.exists()


def test_reads_pickles_written_by_rlbench_old_and_new_fields_all_protocols(tmp_path,
                                                                            run_with_rlbench):
  run_with_rlbench(f"""
      import pickle, numpy as np
      from rlbench.demo import Demo
      from rlbench.backend.observation import Observation
      new = dict(front_rgb=None, overhead_rgb=None, overhead_point_cloud=None,
                 joint_velocities=np.arange(7.0), gripper_open=1.0,
                 gripper_pose=np.arange(7, dtype=np.float32), ignore_collisions=np.array(1.0),
                 misc={{"front_camera_near": np.float64(0.5),
                       "front_camera_extrinsics": np.eye(4)}})
      # RLBench 2020: no overhead camera / point clouds / misc; had wrist_camera_matrix.
      old = dict(left_shoulder_rgb=None, front_mask=None, joint_velocities=np.zeros(7),
                 gripper_open=0.0, gripper_pose=np.ones(7), wrist_camera_matrix=np.eye(4),
                 task_low_dim_state=np.array([1.5, 2.5]))
      for protocol in (2, 3, 4, 5):
        for name, fields in (("new", new), ("old", old)):
          folder = "{tmp_path}/%s%d" % (name, protocol)
          __import__("os").makedirs(folder)
          demo = Demo([Observation(**fields)] * 2, random_seed=np.random.RandomState(0).get_state(),
                      num_reset_attempts=3)
          with open(folder + "/low_dim_obs.pkl", "wb") as f:
            pickle.dump(demo, f, protocol=protocol)
      """)
  for protocol in (2, 3, 4, 5):
    new = rlbench_io.load_demo(tmp_path / f"new{protocol}")
    assert len(new) == 2 and new.num_reset_attempts == 3
    np.testing.assert_array_equal(new[1].joint_velocities, np.arange(7.0))
    assert new[0].gripper_pose.dtype == np.float32
    assert new[0].misc["front_camera_near"] == 0.5
    np.testing.assert_array_equal(new[0].misc["front_camera_extrinsics"], np.eye(4))
    assert new[0].overhead_point_cloud is None and new[0].extra_fields == {}
    assert new.random_seed[0] == "MT19937"
    np.testing.assert_array_equal(new.random_seed[1], np.random.RandomState(0).get_state()[1])
    old = rlbench_io.load_demo(tmp_path / f"old{protocol}")
    assert old[0].gripper_open == 0.0 and old[0].misc is None and old[0].ignore_collisions is None
    np.testing.assert_array_equal(old[0].task_low_dim_state, [1.5, 2.5])
    np.testing.assert_array_equal(old[0].extra_fields["wrist_camera_matrix"], np.eye(4))


def test_rlbench_can_read_what_we_write(tmp_path, run_with_rlbench, make_demo):
  demo, images = make_demo(num_frames=5)
  rlbench_io.save_demo(demo, tmp_path / "episode0", {"front": images})
  out = run_with_rlbench(f"""
      import pickle
      with open("{tmp_path}/episode0/low_dim_obs.pkl", "rb") as f:
        demo = pickle.load(f)
      obs = demo[4]
      print(type(demo).__module__, type(demo).__name__, type(obs).__module__, type(obs).__name__)
      print(len(demo), obs.front_rgb is None, obs.overhead_point_cloud is None, obs.gripper_open)
      print(obs.gripper_pose.tolist())
      """)
  lines = out.splitlines()
  assert lines[0] == "rlbench.demo Demo rlbench.backend.observation Observation"
  assert lines[1] == "5 True True 0.0"
  assert lines[2] == str(demo[4].gripper_pose.tolist())


@pytest.mark.parametrize("data, message", [
    (b"", "corrupt pickle"),
    (b"\x80\x04garbage", "corrupt pickle"),
    (pickle.dumps([1, 2, 3]), "expected rlbench.demo.Demo"),
    (dump_pickle({"_observations": []}), "expected rlbench.demo.Demo"),
    # A Demo whose state is not an attribute dict (BUILD with a list).
    (b"\x80\x04\x8c\x0crlbench.demo\x8c\x04Demo\x93)\x81]b.", "Demo state is list"),
])
def test_malformed_pickles_raise_demo_error_naming_the_file(tmp_path, data, message):
  (tmp_path / "low_dim_obs.pkl").write_bytes(data)
  with pytest.raises(DemoError, match=message) as info:
    rlbench_io.load_demo(tmp_path)
  assert str(tmp_path / "low_dim_obs.pkl") in str(info.value)


def test_missing_pickle(tmp_path):
  with pytest.raises(MissingFileError, match="missing file .*low_dim_obs.pkl"):
    rlbench_io.load_demo(tmp_path)


def test_object_arrays_cannot_smuggle_calls(tmp_path):
  path = tmp_path / "x.pkl"
  path.write_bytes(pickle.dumps(np.array([_Reduces(os.system, "true")], dtype=object)))
  with pytest.raises(UnsafePickleError, match="refused global posix.system"):
    load_pickle(path)
