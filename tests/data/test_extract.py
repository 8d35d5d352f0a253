"""Extractor: planted faults are reported and skipped; output is deterministic; no split leaks;
unusable descriptions fall back to the task name; nothing usable fails without touching --out."""

from __future__ import annotations

import collections
import json
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from robot_r1_jax.data import extract, mcqa, records, rlbench_io, rlbench_pickle
from robot_r1_jax.data.demo import Demo, Observation
from robot_r1_jax.data.keyframes import discover_keyframes

_REPO = pathlib.Path(__file__).resolve().parents[2]
_CONFIG = extract.ExtractConfig(image_size=24, val_fraction=0.34, progress=False)


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def faulty_tree(tmp_path, make_episode):
  """A demo tree with good episodes and one planted fault per kind; returns (root, faults)."""
  root = tmp_path / "demos"
  for k in range(3):
    make_episode(root, "task_a", k, seed=k)
    make_episode(root, "task_b", k, seed=10 + k)
  faults = {}
  # Garbage bytes instead of a pickle.
  (make_episode(root, "task_a", 3, seed=3) / "low_dim_obs.pkl").write_bytes(b"\x80\x04garbage")
  faults["task_a/variation0/episode3"] = "corrupt pickle"
  # A pickle that would run a shell command.
  marker = tmp_path / "pwned"
  (make_episode(root, "task_a", 4, seed=4) / "low_dim_obs.pkl").write_bytes(
      f"cos\nsystem\n(Vtouch {marker}\ntR.".encode())
  faults["task_a/variation0/episode4"] = "refused global os.system"
  # The image of a question frame (frame 0 always is one) is missing.
  (make_episode(root, "task_a", 5, seed=5) / "front_rgb" / "0.png").unlink()
  faults["task_a/variation0/episode5"] = "missing image"
  # One observation only.
  rlbench_io.save_demo(Demo([Observation(gripper_open=1.0, joint_velocities=np.zeros(7))]),
                       root / "task_a/variation0/episodes/episode6",
                       {"front": [np.zeros((8, 8, 3), np.uint8)]})
  faults["task_a/variation0/episode6"] = "too short"
  # No low_dim_obs.pkl at all.
  (root / "task_a/variation0/episodes/episode7").mkdir()
  faults["task_a/variation0/episode7"] = "missing file"
  # No gripper poses.
  demo = rlbench_io.load_demo(root / "task_b/variation0/episodes/episode0")
  for obs in demo:
    obs.gripper_pose = None
  rlbench_io.save_demo(demo, root / "task_b/variation0/episodes/episode3",
                       {"front": [np.zeros((8, 8, 3), np.uint8)] * len(demo)})
  faults["task_b/variation0/episode3"] = "no finite 7-d gripper_pose"
  # A variation without its descriptions file: extracted all the same (see the test below).
  make_episode(root, "task_b", 0, seed=20, variation=1)
  (root / "task_b/variation1/variation_descriptions.pkl").unlink()
  # all_variations: one good episode and one without variation_number.pkl.
  demo = rlbench_io.load_demo(root / "task_b/variation0/episodes/episode1")
  images = [demo.image(i) for i in range(len(demo))]
  rlbench_io.save_demo(demo, root / "task_b/all_variations/episodes/episode0", {"front": images},
                       variation_number=2, descriptions=["press the button"])
  rlbench_io.save_demo(demo, root / "task_b/all_variations/episodes/episode1", {"front": images},
                       descriptions=["press the button"])
  faults["task_b/all_variations/episode1"] = "variation_number.pkl"
  return root, faults, marker


def test_faults_are_reported_and_output_is_deterministic(tmp_path, faulty_tree):
  root, faults, marker = faulty_tree
  manifest = extract.extract(root, tmp_path / "out", _CONFIG)
  first = _files(tmp_path / "out")
  assert not marker.exists()
  skipped = {s.episode: s.reason for s in manifest.skipped}
  assert set(skipped) == set(faults)
  for episode, reason in faults.items():
    assert reason in skipped[episode], (episode, skipped[episode])
  assert manifest.episodes_found == (3 + 5) + (3 + 1 + 1 + 2)  # task_a + task_b, good + faulty.

  # Re-running over the same folder, and into a fresh one, gives byte-identical files.
  extract.extract(root, tmp_path / "out", _CONFIG)
  assert _files(tmp_path / "out") == first
  extract.extract(root, tmp_path / "again", _CONFIG)
  assert _files(tmp_path / "again") == first

  # Shards hold what the manifest says; splits share no episode; images are resized.
  assert records.Manifest.load(tmp_path / "out") == manifest
  (tmp_path / "again" / "manifest.json").write_text('{"schema_version": 2}')
  with pytest.raises(ValueError, match="manifest.json: not a usable manifest .*schema_version=2"):
    records.Manifest.load(tmp_path / "again")
  episodes_by_split = {}
  for split, info in manifest.splits.items():
    questions = [r.question for path in manifest.shard_paths(tmp_path / "out", split)
                 for r in records.read_records(path)]
    assert len(questions) == info.num_records
    assert dict(collections.Counter(q.task for q in questions)) == info.by_task
    assert dict(collections.Counter(q.question_type for q in questions)) == info.by_type
    assert {q.episode for q in questions} == set(info.episodes)
    episodes_by_split[split] = set(info.episodes)
  assert not episodes_by_split["train"] & episodes_by_split["val"]
  good = {"task_a/variation0/episode0", "task_a/variation0/episode1", "task_a/variation0/episode2",
          "task_b/variation0/episode0", "task_b/variation0/episode1", "task_b/variation0/episode2",
          "task_b/variation1/episode0", "task_b/all_variations/episode0"}
  assert episodes_by_split["train"] | episodes_by_split["val"] == good
  record = next(records.read_records(manifest.shard_paths(tmp_path / "out", "train")[0]))
  assert record.image().shape == (24, 24, 3)


def test_records_match_the_demo(tmp_path, make_episode):
  root = tmp_path / "demos"
  make_episode(root, "push_button", 0, seed=0)
  manifest = extract.extract(root, tmp_path / "out",
                             extract.ExtractConfig(image_size=0, val_fraction=0.0, progress=False))
  demo = rlbench_io.load_demo(root / "push_button/variation0/episodes/episode0")
  got = [r for p in manifest.shard_paths(tmp_path / "out", "train")
         for r in records.read_records(p)]
  expected = mcqa.episode_questions(
      demo, discover_keyframes(demo), task="push_button",
      episode="push_button/variation0/episode0", description="push button", seed=0,
      config=mcqa.McqaConfig())
  assert [r.question for r in got] == expected
  assert all(r.variation == 0 for r in got)
  for r in got[:3]:
    np.testing.assert_array_equal(r.image(), demo.image(r.question.frame))  # image_size=0: as is.
  assert manifest.splits["val"].num_records == 0 and manifest.splits["val"].shards == ()


def test_split_is_per_task_and_seeded(tmp_path):
  refs = [rlbench_io.EpisodeRef(task=t, variation_dir=tmp_path, episode_dir=tmp_path, episode=k,
                                variation=0) for t in ("a", "b") for k in range(20)]
  split = extract.split_episodes(refs, 0.1, seed=0)
  for task in ("a", "b"):
    assert sum(split[r.name] == "val" for r in refs if r.task == task) == 2
  assert split == extract.split_episodes(refs[::-1], 0.1, seed=0)  # Order of discovery is moot.
  assert split != extract.split_episodes(refs, 0.1, seed=1)
  assert set(extract.split_episodes(refs, 0.0, seed=0).values()) == {"train"}
  assert set(extract.split_episodes(refs, 1.0, seed=0).values()) == {"val"}  # a test set


def test_shards_rotate_and_output_is_replaced_atomically(tmp_path, make_episode, monkeypatch):
  root = tmp_path / "demos"
  make_episode(root, "task", 0, seed=0)
  config = extract.ExtractConfig(image_size=0, val_fraction=0.0, shard_size=5, progress=False)
  manifest = extract.extract(root, tmp_path / "out", config)
  sizes = [s.num_records for s in manifest.splits["train"].shards]
  assert sizes[:-1] == [5] * (len(sizes) - 1) and 1 <= sizes[-1] <= 5 and len(sizes) > 1
  before = _files(tmp_path / "out")
  # A failure while writing leaves the previous output untouched and no temporary folders.
  monkeypatch.setattr(records.Manifest, "to_json", lambda self: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    extract.extract(root, tmp_path / "out", config)
  assert _files(tmp_path / "out") == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["demos", "out"]


def test_refuses_dangerous_outputs(tmp_path, make_episode):
  root = tmp_path / "demos"
  make_episode(root, "task", 0, seed=0)
  with pytest.raises(ValueError, match="would replace the demos"):
    extract.extract(root, root, _CONFIG)
  with pytest.raises(ValueError, match="would replace the demos"):
    extract.extract(root, tmp_path, _CONFIG)
  (tmp_path / "precious").mkdir()
  (tmp_path / "precious" / "thesis.tex").write_text("x")
  with pytest.raises(ValueError, match="not an extractor output"):
    extract.extract(root, tmp_path / "precious", _CONFIG)
  assert (tmp_path / "precious" / "thesis.tex").read_text() == "x"
  with pytest.raises(rlbench_io.DemoError, match="no episodes under"):
    extract.extract(tmp_path / "precious", tmp_path / "out", _CONFIG)
  with pytest.raises(ValueError, match=r"val_fraction=1.5 must be in \[0, 1\]"):
    extract.ExtractConfig(val_fraction=1.5)


def test_command_line(tmp_path, make_episode):
  root = tmp_path / "demos"
  make_episode(root, "task", 0, seed=0)
  make_episode(root, "task", 1, seed=1)
  env = dict(os.environ, PYTHONPATH=str(_REPO))
  command = [sys.executable, "-W", "error", "-m", "robot_r1_jax.data.extract", f"--demos={root}",
             f"--out={tmp_path / 'out'}", "--image_size=40", "--val_fraction=0.5",
             "--frame_interval=5", "--noprogress"]
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
  assert result.returncode == 0, result.stderr
  manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
  assert manifest["config"]["image_size"] == 40
  assert manifest["config"]["mcqa"]["frame_interval"] == 5
  assert manifest["splits"]["train"]["episodes"] and manifest["splits"]["val"]["episodes"]
  assert "train:" in result.stdout and "val:" in result.stdout
  bad = subprocess.run(command[:-2] + ["--val_fraction=1.5"], env=env, capture_output=True,
                       text=True, timeout=120, check=False)
  assert bad.returncode != 0 and "--val_fraction=1.5 must be in [0, 1]" in bad.stderr
  command = [f"--out={tmp_path / 'movement'}" if c.startswith("--out=") else c for c in command]
  subset = subprocess.run(command + ["--question_types=movement"], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
  assert subset.returncode == 0, subset.stderr
  shards = sorted((tmp_path / "movement").glob("*.array_record"))
  types = {r.question.question_type for s in shards for r in records.read_records(s)}
  assert types == {"movement"}
  bad = subprocess.run(command + ["--question_types=movement,grasp"], env=env,
                       capture_output=True, text=True, timeout=120, check=False)
  assert bad.returncode != 0 and "--question_types=('movement', 'grasp')" in bad.stderr


_DESCRIPTION_FAULTS = {
    # A pickled object that is not a list of str, as older RLBench datasets hold.
    "pickled_demo": (lambda path, episode: path.write_bytes(
        (episode / "low_dim_obs.pkl").read_bytes()), "found rlbench.demo.Demo"),
    "pickled_dict": (lambda path, episode: path.write_bytes(
        rlbench_pickle.dump_pickle({"0": "reach"})), "found dict"),
    "garbage": (lambda path, episode: path.write_bytes(b"\x80\x04garbage"), "corrupt pickle"),
    "removed": (lambda path, episode: path.unlink(), "missing file"),
    "refused_global": (lambda path, episode: path.write_bytes(
        f"cos\nsystem\n(Vtouch {path.parent / 'pwned'}\ntR.".encode()),
                       "refused global os.system"),
}


@pytest.mark.parametrize("fault", sorted(_DESCRIPTION_FAULTS))
def test_unusable_descriptions_fall_back_to_the_task_name(tmp_path, make_episode, caplog, fault):
  root = tmp_path / "demos"
  for k in range(2):
    episode = make_episode(root, "reach_target", k, seed=k)
    make_episode(root, "reach_target", k, seed=5 + k, variation=1)  # Healthy descriptions.
  damage, found = _DESCRIPTION_FAULTS[fault]
  path = root / "reach_target/variation0/variation_descriptions.pkl"
  damage(path, episode)
  with caplog.at_level(logging.WARNING):
    manifest = extract.extract(root, tmp_path / "out", _CONFIG)
  assert not manifest.skipped
  assert not (path.parent / "pwned").exists()  # The allow-list constructed nothing it refuses.
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1, warnings  # One per variation, not per episode.
  assert str(path) in warnings[0] and found in warnings[0] and "'reach target'" in warnings[0]
  questions = [r.question for split in extract.SPLITS
               for p in manifest.shard_paths(tmp_path / "out", split)
               for r in records.read_records(p)]
  descriptions = {q.episode.split("/")[1]: q.description for q in questions}
  assert descriptions == {"variation0": "reach target", "variation1": "reach target"}
  assert {q.episode for q in questions} == {f"reach_target/variation{v}/episode{k}"
                                            for v in (0, 1) for k in (0, 1)}
  fallback = manifest.instructions["reach_target/variation0"]
  assert (fallback.source, fallback.instruction) == ("task_name", "reach target")
  assert fallback.file == "reach_target/variation0/variation_descriptions.pkl"
  assert found in fallback.problem
  # The healthy variation's instruction is its file's first description (write_episode's).
  assert manifest.instructions["reach_target/variation1"] == records.InstructionSource(
      "file", "reach target", "reach_target/variation1/variation_descriptions.pkl")
  assert records.Manifest.load(tmp_path / "out") == manifest


def test_all_variations_episode_falls_back_alone(tmp_path, make_episode, caplog):
  root = tmp_path / "demos"
  demo = rlbench_io.load_demo(make_episode(root, "open_drawer", 0, seed=0))
  images = [demo.image(i) for i in range(len(demo))]
  for k in range(2):
    rlbench_io.save_demo(demo, root / f"open_drawer/all_variations/episodes/episode{k}",
                         {"front": images}, variation_number=3, descriptions=["open the drawer"])
  bad = root / "open_drawer/all_variations/episodes/episode1/variation_descriptions.pkl"
  bad.write_bytes(rlbench_pickle.dump_pickle(7))
  with caplog.at_level(logging.WARNING):
    manifest = extract.extract(root, tmp_path / "out", _CONFIG)
  assert not manifest.skipped
  by_episode = {r.question.episode: r.question.description for split in extract.SPLITS
                for p in manifest.shard_paths(tmp_path / "out", split)
                for r in records.read_records(p)}
  assert by_episode == {"open_drawer/variation0/episode0": "open drawer",
                        "open_drawer/all_variations/episode0": "open the drawer",
                        "open_drawer/all_variations/episode1": "open drawer"}
  assert manifest.instructions["open_drawer/variation3"].source == "task_name"
  assert manifest.instructions["open_drawer/variation3"].file == str(bad.relative_to(root))
  assert [r.getMessage().split(":")[0] for r in caplog.records] == ["open_drawer/variation3"]


def _truncate_low_dim(episode_dir: pathlib.Path) -> None:
  path = episode_dir / "low_dim_obs.pkl"
  path.write_bytes(path.read_bytes()[:100])


def test_nothing_usable_fails_and_keeps_the_previous_output(tmp_path, make_episode):
  root = tmp_path / "demos"
  episodes = [make_episode(root, "task", k, seed=k) for k in range(4)]
  extract.extract(root, tmp_path / "out", _CONFIG)
  before = _files(tmp_path / "out")
  for episode in episodes:
    _truncate_low_dim(episode)
  with pytest.raises(extract.ExtractionError) as error:
    extract.extract(root, tmp_path / "out", _CONFIG)
  message = str(error.value)
  assert "no question written, nothing replaced in" in message
  assert "skipped 4 of 4 episode(s)" in message
  # One group (the four truncations differ only in their folder), three paths named, then "…".
  assert ("4 × DemoError: <episode>/low_dim_obs.pkl: corrupt pickle: task/variation0/episodes/"
          "episode0, task/variation0/episodes/episode1, task/variation0/episodes/episode2, …"
          in message), message
  assert _files(tmp_path / "out") == before


def _run_cli(root: pathlib.Path, out: pathlib.Path) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(_REPO))
  command = [sys.executable, "-W", "error", "-m", "robot_r1_jax.data.extract", f"--demos={root}",
             f"--out={out}", "--image_size=24", "--val_fraction=0", "--noprogress"]
  return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                        check=False)


def test_command_line_exit_status_follows_what_was_extracted(tmp_path, make_episode):
  root = tmp_path / "demos"
  episodes = [make_episode(root, "task", k, seed=k) for k in range(4)]
  (root / "task/variation0/variation_descriptions.pkl").write_bytes(b"garbage")
  for episode in episodes[2:]:
    _truncate_low_dim(episode)
  half = _run_cli(root, tmp_path / "half")
  assert half.returncode == 0, half.stderr
  assert "train: " in half.stdout and "from 2 episodes" in half.stdout
  assert "skipped 2 of 4 episode(s)" in half.stdout
  assert "2 × DemoError: <episode>/low_dim_obs.pkl: corrupt pickle" in half.stdout
  assert "task/variation0" in half.stdout and "made from the task name" in half.stdout
  assert "variation_descriptions.pkl: corrupt pickle" in half.stderr  # The warning.
  for episode in episodes[:2]:
    _truncate_low_dim(episode)
  none = _run_cli(root, tmp_path / "none")
  assert none.returncode == 1, none.stdout
  assert "skipped 4 of 4 episode(s)" in none.stderr and "Traceback" not in none.stderr
  assert not (tmp_path / "none").exists()
