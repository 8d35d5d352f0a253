"""MCQA: uniform answer letters, distinct options, the "slightly" rule, purity, frame sampling."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import re

import numpy as np
import pytest

from robot_r1_jax.data import mcqa
from robot_r1_jax.data.keyframes import discover_keyframes


def _ctx(frame: int = 10, **changes) -> mcqa.FrameContext:
  ctx = mcqa.FrameContext(task="pick_up_cup", episode="pick_up_cup/variation0/episode0",
                          frame=frame, next_keyframe=37, description="pick up the red cup",
                          state_xyz=(0.2784, -0.0121, 1.1543), next_xyz=(0.3011, 0.0846, 0.8122))
  return dataclasses.replace(ctx, **changes)


def _parse_xyz(text: str) -> np.ndarray:
  return np.array([float(v) for v in re.fullmatch(r"\[(.*), (.*), (.*)\]", text).groups()])


def _sample(question_type: str, n: int, config: mcqa.McqaConfig = mcqa.McqaConfig()):
  rng = np.random.default_rng(0)
  for frame in range(n):
    state, step = rng.uniform(-0.2, 1.0, 3), rng.normal(0, 0.1, 3)
    yield mcqa.build_question(question_type, _ctx(frame, state_xyz=tuple(state),
                                                  next_xyz=tuple(state + step)),
                              seed=7, config=config)


@pytest.mark.parametrize("question_type", mcqa.QUESTION_TYPES)
def test_answer_letter_is_uniform_and_right(question_type):
  n = 2000
  counts = collections.Counter()
  for q in _sample(question_type, n):
    counts[q.answer_letter] += 1
    assert q.answer == f"[[{q.answer_letter}]]"
    truth = q.options["ABCD".index(q.answer_letter)]
    if question_type == "movement":
      assert truth == mcqa.movement_text(np.subtract(q.next_xyz, q.state_xyz))
    else:
      target = q.next_xyz if question_type == "waypoint" else q.state_xyz
      assert truth == mcqa.format_xyz(target) and q.target_xyz == target
  # Pearson chi-square with 3 degrees of freedom; 21.1 is its 1e-4 upper quantile, so a fair
  # shuffle fails this (deterministic, seeded) check with probability 1e-4 and a biased one, e.g.
  # A in 30% instead of 25%, fails it with near certainty at n = 2000 (expected chi-square ≈ 27).
  chi2 = sum((counts[letter] - n / 4) ** 2 / (n / 4) for letter in "ABCD")
  assert chi2 < 21.1, counts


@pytest.mark.parametrize("question_type", mcqa.QUESTION_TYPES)
def test_options_are_distinct_and_well_separated(question_type):
  # A tight workspace around the states makes collisions likely if separation were not enforced.
  config = mcqa.McqaConfig(workspace=mcqa.Workspace(low=(-0.2, -0.2, -0.2), high=(1.0, 1.0, 1.0)),
                           min_separation=0.1)
  for q in _sample(question_type, 500, config):
    assert len(q.options) == 4 and len(set(q.options)) == 4
    if question_type != "movement":
      points = [_parse_xyz(o) for o in q.options]
      for a, b in itertools.combinations(points, 2):
        assert np.linalg.norm(a - b) >= 0.1 - 1e-3  # The truth is printed rounded.
    else:
      for option in q.options:
        terms = option.split(", ")
        assert not all(t.startswith("slightly ") for t in terms), option


@pytest.mark.parametrize("delta, words", [
    ((0.10, -0.05, 0.02), "forward, slightly left, slightly up"),  # 0.05 = ½·0.10: slightly.
    ((0.10, -0.051, 0.0), "forward, left"),  # 0.051 > ½·0.10; z does not move.
    ((-0.2, 0.1, 0.3), "backward, slightly right, up"),  # ½·0.3 = 0.15: |x| above, |y| below.
    ((0.0, 0.0, -0.04), "down"),
    ((0.1, -0.1, 0.1), "forward, left, up"),
    ((0.0004, 0.3, -0.2), "right, down"),  # |x| < 1 mm is jitter; |z| = 0.2 > 0.15.
    ((0.0004, 0.0, 0.0), ""),
])
def test_movement_words_follow_the_slightly_rule(delta, words):
  assert mcqa.movement_text(delta) == words


def test_movement_distractors_are_one_edit_neighbours():
  truth_delta = (0.10, -0.05, 0.02)
  for frame in range(50):
    q = mcqa.build_question("movement", _ctx(frame, state_xyz=(0.0, 0.0, 1.0),
                                             next_xyz=(0.10, -0.05, 1.02)),
                            seed=0, config=mcqa.McqaConfig())
    truth = mcqa.movement_text(truth_delta)
    assert q.options.count(truth) == 1
    for option in q.options:
      if option != truth:
        differing = set(option.split(", ")) ^ set(truth.split(", "))
        assert 1 <= len(differing) <= 2, option  # One term changed, dropped or added.
  # Nothing to ask when the gripper does not move.
  assert mcqa.build_question("movement", _ctx(next_xyz=_ctx().state_xyz), seed=0,
                             config=mcqa.McqaConfig()) is None


def test_questions_are_pure_functions_of_their_inputs():
  config = mcqa.McqaConfig()
  for question_type in mcqa.QUESTION_TYPES:
    a = mcqa.build_question(question_type, _ctx(), seed=3, config=config)
    assert a == mcqa.build_question(question_type, _ctx(), seed=3, config=config)
    others = {mcqa.build_question(question_type, _ctx(), seed=s, config=config).options
              for s in range(10)}
    assert len(others) > 1  # The seed matters.


def test_open_ended_xyz_format_and_tokens():
  config = mcqa.McqaConfig(answer_format="xyz")
  q = mcqa.build_question("waypoint", _ctx(), seed=0, config=config)
  assert q.options == () and q.answer_letter is None and q.answer == "[0.301, 0.085, 0.812]"
  assert "[[A]]" not in q.prompt and "<answer> [x, y, z] </answer>" in q.prompt
  assert q.target_xyz == _ctx().next_xyz
  assert q.target_tokens == mcqa.discretize(q.target_xyz, config.workspace)
  assert mcqa.build_question("movement", _ctx(), seed=0, config=config) is None


def test_action_tokens_answer_with_the_bins_the_prompt_states():
  config = mcqa.McqaConfig(answer_format="action_tokens", action_bins=100,
                           workspace=mcqa.Workspace(low=(-0.2, -0.3, 0.7), high=(0.8, 0.7, 1.7)))
  q = mcqa.build_question("waypoint", _ctx(), seed=0, config=config)
  assert q.options == () and q.answer_letter is None
  assert q.target_tokens == mcqa.discretize(_ctx().next_xyz, config.workspace, 100)
  assert q.answer == " ".join(map(str, q.target_tokens))
  assert ("x from -0.200 to 0.800 m, y from -0.300 to 0.700 m, z from 0.700 to 1.700 m) is cut "
          "into 100 equal bins, numbered 0 to 99") in q.prompt
  assert "<answer> 50 50 50 </answer>" in q.prompt and "[[A]]" not in q.prompt
  assert mcqa.build_question("movement", _ctx(), seed=0, config=config) is None
  back = mcqa.undiscretize(q.target_tokens, config.workspace, 100)
  assert np.all(np.abs(np.subtract(back, _ctx().next_xyz)) <= 0.5 / 100 + 1e-12)  # half a bin


def test_discretize_round_trip():
  ws = mcqa.Workspace(low=(0.0, -1.0, 0.5), high=(1.0, 1.0, 1.5))
  assert mcqa.discretize(ws.low, ws) == (0, 0, 0)
  assert mcqa.discretize(ws.high, ws) == (255, 255, 255)  # The top edge belongs to the last bin.
  assert mcqa.discretize((-5.0, 0.0, 9.0), ws) == (0, 128, 255)
  xyz = np.random.default_rng(0).uniform(ws.low, ws.high, size=(100, 3))
  for p in xyz:
    back = mcqa.undiscretize(mcqa.discretize(p, ws), ws)
    assert np.all(np.abs(np.subtract(back, p)) <= (np.subtract(ws.high, ws.low)) / 512 + 1e-12)


def test_question_frames_every_interval_before_each_keyframe():
  assert mcqa.question_frames([25, 40, 59], 10) == [
      (0, 25), (10, 25), (20, 25), (25, 40), (35, 40), (40, 59), (50, 59)]
  assert mcqa.question_frames([], 10) == []
  assert mcqa.question_frames([3], 1) == [(0, 3), (1, 3), (2, 3)]


def test_episode_questions(make_demo):
  demo, _ = make_demo(num_frames=60)
  keyframes = discover_keyframes(demo)
  questions = mcqa.episode_questions(demo, keyframes, task="t", episode="t/variation0/episode0",
                                     description="do it", seed=0, config=mcqa.McqaConfig())
  frames = mcqa.question_frames(keyframes, 10)
  assert [(q.frame, q.question_type) for q in questions if q.question_type != "movement"] == [
      (f, t) for f, _ in frames for t in ("waypoint", "current_state")]
  movement_frames = [q.frame for q in questions if q.question_type == "movement"]
  assert set(movement_frames) <= {f for f, _ in frames} and len(movement_frames) >= len(frames) - 2
  q = questions[0]
  assert q.state_xyz == tuple(demo[q.frame].gripper_pose[:3])
  assert q.next_xyz == tuple(demo[q.next_keyframe].gripper_pose[:3])
  # JSON round trip (what the extractor stores).
  assert mcqa.Question.from_dict(json.loads(json.dumps(q.to_dict()))) == q


def test_a_subset_of_types_asks_the_same_questions(make_demo):
  """What lets an RL stage train on movement alone and be scored on a full extraction's val."""
  demo, _ = make_demo(num_frames=60)
  ask = lambda **kw: mcqa.episode_questions(
      demo, discover_keyframes(demo), task="t", episode="t/variation0/episode0",
      description="do it", seed=3, config=mcqa.McqaConfig(**kw))
  key = lambda q: (q.frame, q.question_type)
  full = ask()
  for subset in [("movement",), ("current_state", "waypoint")]:
    want = [q for q in full if q.question_type in subset]
    assert want and sorted(ask(question_types=subset), key=key) == sorted(want, key=key)


def test_config_errors_name_the_field():
  for kwargs, field in [({"frame_interval": 0}, "frame_interval"),
                        ({"question_types": ("waypoint", "grasp")}, "question_types"),
                        ({"answer_format": "tokens"}, "answer_format"),
                        ({"min_separation": 0.001}, "min_separation"),
                        ({"prompt_style": "short"}, "prompt_style")]:
    with pytest.raises(ValueError, match=field):
      mcqa.McqaConfig(**kwargs)
  with pytest.raises(ValueError, match="Workspace low"):
    mcqa.Workspace(low=(0, 0, 0), high=(1, 0, 1))
  tiny = mcqa.McqaConfig(workspace=mcqa.Workspace(low=(0, 0, 0), high=(0.01, 0.01, 0.01)))
  with pytest.raises(ValueError, match="cannot place 3 distractors"):
    mcqa.build_question("waypoint", _ctx(), seed=0, config=tiny)


def test_config_round_trips_through_a_manifest_json():
  config = mcqa.McqaConfig(answer_format="xyz", prompt_style="compact", frame_interval=7,
                      workspace=mcqa.Workspace(low=(-0.1, -0.2, 0.8), high=(0.5, 0.4, 1.3)),
                      metadata=mcqa.RobotMetadata(finger_length=0.05))
  data = json.loads(json.dumps(dataclasses.asdict(config)))
  assert mcqa.McqaConfig.from_dict(data) == config
  with pytest.raises(ValueError, match="unknown question settings .*'colour'"):
    mcqa.McqaConfig.from_dict({**data, "colour": "red"})
