"""SFT targets: full rewards for every question type and format, reasoning from the question's own
numbers, determinism, and loud errors for targets that would be wrong."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from robot_r1_jax.data import mcqa, sft_targets
from robot_r1_jax.data.prompts import (ANSWER_FORMATS, CURRENT_STATE, LETTERS, MCQA, MOVEMENT,
                                       QUESTION_TYPES, WAYPOINT, XYZ, format_number, format_xyz)
from robot_r1_jax.rl import rewards

_CTX = mcqa.FrameContext(task="pick_up_cup", episode="pick_up_cup/variation0/episode0", frame=10,
                         next_keyframe=37, description="pick up the red cup",
                         state_xyz=(0.2784, -0.0121, 1.1543), next_xyz=(0.3011, 0.0846, 0.8122))
_CASES = [(fmt, kind, t) for fmt in ANSWER_FORMATS for kind in sft_targets.TARGET_KINDS
          for t in QUESTION_TYPES
          if fmt == MCQA or not (t == MOVEMENT or kind == sft_targets.CHECK)]


def _questions(question_type: str, answer_format: str, n: int = 300) -> list[mcqa.Question]:
  """Random states and steps, including sub-millimetre axes, a stationary gripper and moves
  that sit exactly on the "slightly" boundary."""
  rng = np.random.default_rng(1)
  config = mcqa.McqaConfig(answer_format=answer_format)
  out = []
  for frame in range(n):
    state = rng.uniform((-0.3, -0.5, 0.752), (0.7, 0.5, 1.6))
    step = rng.normal(0, 0.15, 3) * (rng.uniform(size=3) > 0.2)  # some axes do not move
    if frame % 10 == 0:
      step[rng.integers(3)] = rng.uniform(-9e-4, 9e-4)  # jitter below min_axis_move
    if frame % 17 == 0:
      step = np.array([0.2, -0.1, 0.05])  # |Δy| exactly half the largest: "slightly"
    if frame % 23 == 0:
      step = np.zeros(3)  # no move (no movement question; a waypoint where the gripper is)
    ctx = dataclasses.replace(_CTX, frame=frame, state_xyz=tuple(state),
                              next_xyz=tuple(state + step))
    question = mcqa.build_question(question_type, ctx, seed=3, config=config)
    if question is not None:
      out.append(question)
  return out


@pytest.mark.parametrize("answer_format,kind,question_type", _CASES)
def test_every_target_scores_full_format_and_answer_reward(answer_format, kind, question_type):
  questions = _questions(question_type, answer_format)
  assert len(questions) > 250
  config = sft_targets.TargetConfig(kind=kind)
  texts = [sft_targets.target_text(q, config) for q in questions]
  # The learner passes each question's `answer` as the reference (Batch.answers).
  out = rewards.compute_rewards(texts, [q.answer for q in questions])
  np.testing.assert_array_equal(out.format, 1.0)
  np.testing.assert_array_equal(out.answer if answer_format == MCQA else out.xyz, 1.0)
  np.testing.assert_array_equal(out.open_ended, answer_format != MCQA)
  # Deterministic, and equal for a question that went through the shard's JSON round trip.
  again = [sft_targets.target_text(mcqa.Question.from_dict(q.to_dict()), config)
           for q in questions]
  assert again == texts


def test_direct_target_is_the_answer_after_an_empty_think_block():
  question = mcqa.build_question(WAYPOINT, _CTX, seed=0, config=mcqa.McqaConfig())
  text = sft_targets.target_text(question, sft_targets.TargetConfig(kind="direct"))
  assert text == f"<think> </think> <answer> [[{question.answer_letter}]] </answer>"


def test_cot_reasoning_of_a_waypoint_question_reads_as_written():
  question = mcqa.build_question(WAYPOINT, _CTX, seed=0, config=mcqa.McqaConfig())
  assert question.answer == "[[A]]"
  assert sft_targets.target_text(question, sft_targets.TargetConfig(kind="cot")) == (
      "<think> The gripper is at [0.278, -0.012, 1.154]. To make progress it should next reach "
      "[0.301, 0.085, 0.812]: it moves slightly forward 0.023 m, slightly right 0.097 m and down "
      "0.342 m, 0.356 m in all. Option [[A]] is [0.301, 0.085, 0.812], so the answer is [[A]]. "
      "</think> <answer> [[A]] </answer>")


@pytest.mark.parametrize("question_type", QUESTION_TYPES)
def test_cot_reasoning_uses_the_questions_own_numbers(question_type):
  for q in _questions(question_type, MCQA, n=100):
    text = sft_targets.reasoning_text(q)
    right = q.options[LETTERS.index(q.answer_letter)]
    assert format_xyz(q.state_xyz) in text
    assert f"Option {q.answer} is" in text and text.endswith(f"the answer is {q.answer}.")
    assert right in text
    # No other option is named as the answer.
    assert all(f"Option [[{c}]]" not in text for c in LETTERS if c != q.answer_letter)
    delta = np.subtract(q.next_xyz, q.state_xyz)
    if question_type == CURRENT_STATE:
      # Offsets from the table-top centre the prompt states, per axis.
      offsets = np.subtract(q.state_xyz, (0.25, 0.0, 0.752))
      for d in offsets:
        assert f"{format_number(abs(d))} m " in text
      continue
    assert format_xyz(q.next_xyz) in text
    labels = mcqa.movement_label(delta)
    words = mcqa.movement_text(delta).split(", ") if labels else []
    for word, (axis, _, _) in zip(words, labels):
      # Each moving axis: its direction word (with "slightly" where it applies) and distance.
      assert f"{word} {format_number(abs(delta[axis]))} m" in text
    if labels:
      assert f"{format_number(float(np.linalg.norm(delta)))} m in all" in text


def test_check_reasoning_of_a_movement_question_reads_as_written():
  question = mcqa.build_question(MOVEMENT, _CTX, seed=0, config=mcqa.McqaConfig())
  assert question.answer == "[[C]]"
  assert sft_targets.target_text(question, sft_targets.TargetConfig(kind="check")) == (
      "<think> [[A]] slightly forward, slightly left, down: no. [[B]] slightly forward, down: no. "
      "[[C]] slightly forward, slightly right, down: yes, so the answer is [[C]]. </think> "
      "<answer> [[C]] </answer>")


@pytest.mark.parametrize("question_type", QUESTION_TYPES)
def test_check_reasoning_copies_options_in_order_and_stops_at_the_right_one(question_type):
  for q in _questions(question_type, MCQA, n=100):
    right = LETTERS.index(q.answer_letter)
    expected = [f"[[{c}]] {o}: no." for c, o in zip(LETTERS[:right], q.options[:right])]
    expected.append(f"[[{q.answer_letter}]] {q.options[right]}: yes, so the answer is {q.answer}.")
    assert sft_targets.check_text(q) == " ".join(expected)
    # Nothing but the options: the truth's numbers appear only as the right option's own text.
    assert format_xyz(q.next_xyz) not in sft_targets.check_text(q).replace(q.options[right], "")


def test_check_targets_need_options():
  question = mcqa.build_question(WAYPOINT, _CTX, seed=0, config=mcqa.McqaConfig(answer_format=XYZ))
  with pytest.raises(ValueError, match="check targets need options; this question is 'xyz'"):
    sft_targets.target_text(question, sft_targets.TargetConfig(kind="check"))


def test_open_ended_targets_answer_with_the_position():
  config = mcqa.McqaConfig(answer_format=XYZ)
  question = mcqa.build_question(CURRENT_STATE, _CTX, seed=0, config=config)
  text = sft_targets.target_text(question, sft_targets.TargetConfig(kind="cot"))
  assert re.fullmatch(r"<think> In the image .* </think> <answer> \[0\.278, -0\.012, 1\.154\] "
                      r"</answer>", text)
  assert rewards.xyz_reward(text, question.target_xyz) == pytest.approx(1.0, abs=2e-3)


def test_a_target_that_disagrees_with_its_question_is_an_error():
  # Extracted with a 5 cm jitter threshold: the y move of 3 cm is not in the right option.
  ctx = dataclasses.replace(_CTX, next_xyz=(0.4784, 0.0179, 1.1543))
  question = mcqa.build_question(MOVEMENT, ctx, seed=0,
                                 config=mcqa.McqaConfig(min_axis_move=0.05))
  with pytest.raises(ValueError, match="min_axis_move=0.001"):
    sft_targets.target_text(question, sft_targets.TargetConfig(kind="direct"))
  ok = sft_targets.target_text(question, sft_targets.TargetConfig(kind="cot", min_axis_move=0.05))
  assert "forward 0.200 m" in ok and "right" not in ok.split("So the gripper moves")[1]
  # A corrupted record (the letter points at a distractor) is refused too.
  wrong = "A" if question.answer_letter != "A" else "B"
  corrupted = dataclasses.replace(question, answer_letter=wrong, answer=f"[[{wrong}]]")
  with pytest.raises(ValueError, match="episode0 frame 10"):
    sft_targets.reasoning_text(corrupted, sft_targets.TargetConfig(min_axis_move=0.05))
  with pytest.raises(ValueError, match="target kind"):
    sft_targets.TargetConfig(kind="sft")
