"""Supervised targets for Robot-R1 questions: the completion an SFT model is trained to write.

Three kinds, all in the output format the prompt asks for and the RL reward checks
(`rl.rewards.format_reward`, `answer_reward` / `xyz_reward`)::

    direct:  <think> </think> <answer> [[C]] </answer>
    cot:     <think> The gripper is at [0.278, -0.012, 1.154]. … so the answer is [[C]]. </think>
             <answer> [[C]] </answer>
    check:   <think> [[A]] [0.049, 0.111, 1.584]: no. [[B]] [-0.119, 0.470, 0.973]: no.
             [[C]] [0.301, 0.085, 0.812]: yes, so the answer is [[C]]. </think>
             <answer> [[C]] </answer>

Open-ended questions answer `<answer> [x, y, z] </answer>` (`answer_format="xyz"`) or the
position's bins, `<answer> 147 130 21 </answer>` (`"action_tokens"`), instead.

Decisions:
  * Direct targets keep an *empty* think block. The paper's Direct-SFT baseline answers without
    reasoning; we keep the answer-only content but still write the (empty) block, because the
    format reward requires exactly one think block before the answer. Without it a Direct-SFT
    model would score 0 on format by construction, and an SFT → RL run started from it would have
    to unlearn its own format before the format reward could help. It costs 4 tokens.
  * CoT reasoning is rule-generated from the question's own numbers, never from anything the
    prompt does not imply: the current position, the next keyframe's position, the change per axis
    in the prompt's direction words (with the same "slightly" rule and jitter threshold as the
    movement options, so the words always agree with the right option), the distance, and which
    option matches. Current-state reasoning reads the position off the image as offsets from the
    table-top centre the prompt states.
  * Check reasoning goes through the options in letter order, copying each and judging it, and
    stops at the right one. It exists for small models trained from scratch, which never learn
    the direct answer: the letter must point at the option whose content is right, and with one
    supervised letter token per question a 3-layer model stays at the uniform ln 4 (600 steps,
    measured). Check targets split that into steps such a model does learn: copying an option
    (an induction pattern), a yes/no about text it has just written, and then the most recent
    letter. Nothing in it states the truth before the verdicts, so a verdict has to come from the
    option and the question, not from equality with a position written earlier.
  * Every target is checked against its question (the right option's text must be what the numbers
    give); a mismatch is a ValueError naming the question, never a silently wrong target. It
    happens when the questions were extracted with another `min_axis_move` than the
    `TargetConfig`'s: build the config from the extractor's manifest (`sft.SplitQuestions`), which
    also gives the table origin the prompts stated.

A target is a pure function of (question, config): deterministic across processes and runs.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from robot_r1_jax.data import mcqa
from robot_r1_jax.data.prompts import (ACTION_TOKENS, CURRENT_STATE, LETTERS, MCQA, MOVEMENT,
                                       WAYPOINT, XYZ, RobotMetadata, format_bins, format_number,
                                       format_xyz)

DIRECT, COT, CHECK = "direct", "cot", "check"
TARGET_KINDS = (DIRECT, COT, CHECK)
_AXES = "xyz"
# Where a position lies relative to the table-top centre, per axis: (negative, positive) offset.
_TABLE_RELATION = (("behind", "in front of"), ("to the left of", "to the right of"),
                   ("below", "above"))
_TABLE_PART = ("the table centre", "it", "the table top")


@dataclasses.dataclass(frozen=True)
class TargetConfig:
  """Which target to write, and the extraction settings the reasoning must agree with."""

  kind: str = DIRECT  # one of TARGET_KINDS
  # Both must equal the extractor's (its manifest's `config.mcqa`): the first decides which axes a
  # movement option names, the second the origin the prompt states.
  min_axis_move: float = mcqa.McqaConfig().min_axis_move
  metadata: RobotMetadata = RobotMetadata()

  def __post_init__(self):
    if self.kind not in TARGET_KINDS:
      raise ValueError(f"target kind={self.kind!r}: choose from {TARGET_KINDS}")
    if self.min_axis_move < 0:
      raise ValueError(f"min_axis_move={self.min_axis_move} must be >= 0")


def target_text(question: mcqa.Question, config: TargetConfig = TargetConfig()) -> str:
  """The completion for `question`: `<think> … </think> <answer> … </answer>`.

  Raises:
    ValueError: the question is inconsistent with itself or with `config` (see the module doc).
  """
  if config.kind == COT:
    think = f"<think> {reasoning_text(question, config)} </think>"
  elif config.kind == CHECK:
    think = f"<think> {check_text(question, config)} </think>"
  else:
    _check_answer(question, config)
    think = "<think> </think>"  # spaced as in the prompt's example `<think> ... </think>`
  return f"{think} <answer> {question.answer} </answer>"


def reasoning_text(question: mcqa.Question, config: TargetConfig = TargetConfig()) -> str:
  """The CoT reasoning (the think block's content) for `question`, from its own numbers.

  Raises:
    ValueError: as `target_text`.
  """
  _check_answer(question, config)
  state, target = format_xyz(question.state_xyz), format_xyz(_truth_xyz(question))
  if question.question_type == CURRENT_STATE:
    offsets = np.subtract(question.state_xyz, config.metadata.table_origin)
    where = [f"{format_number(abs(d))} m {_TABLE_RELATION[axis][int(d >= 0)]} {_TABLE_PART[axis]}"
             for axis, d in enumerate(offsets)]
    sentences = [f"In the image the gripper is {_join(where)}, so it is at {state}."]
  else:
    delta = np.subtract(question.next_xyz, question.state_xyz)
    moves = _moves(delta, config.min_axis_move)
    distance = format_number(float(np.linalg.norm(delta)))
    if question.question_type == WAYPOINT:
      how = (f"it moves {_join(moves)}, {distance} m in all" if moves else
             "that is where it already is")
      sentences = [f"The gripper is at {state}.",
                   f"To make progress it should next reach {target}: {how}."]
    else:
      largest = float(np.max(np.abs(delta)))
      sentences = [
          f"The gripper is at {state} and the next keyframe is at {target}, a change of "
          f"[{', '.join(_signed(d) for d in delta)}] m ({distance} m in all).",
          f"The largest change is {format_number(largest)} m along "
          f"{_AXES[int(np.argmax(np.abs(delta)))]}; a change of at most half of that is slight, "
          f"and one under {config.min_axis_move:g} m is no move.",
          f"So the gripper moves {_join(moves)}."]
  if question.answer_format == MCQA:
    option = question.options[LETTERS.index(question.answer_letter)]
    shown = f'"{option}"' if question.question_type == MOVEMENT else option
    sentences.append(f"Option {question.answer} is {shown}, so the answer is {question.answer}.")
  elif question.answer_format == ACTION_TOKENS:
    sentences.append(f"In the workspace's bins that is {question.answer}.")
  else:
    sentences.append(f"The answer is {question.answer}.")
  return " ".join(sentences)


def check_text(question: mcqa.Question, config: TargetConfig = TargetConfig()) -> str:
  """The check reasoning for a four-option `question`: each option, "no", until the right one.

  Raises:
    ValueError: as `target_text`, or the question is open-ended (it has no options to check).
  """
  _check_answer(question, config)
  if question.answer_format != MCQA:
    raise ValueError(f"{_describe(question)}: check targets need options; this question is "
                     f"{question.answer_format!r}")
  right = LETTERS.index(question.answer_letter)
  checks = [f"[[{letter}]] {option}: no." for letter, option in
            zip(LETTERS[:right], question.options[:right])]
  checks.append(f"[[{question.answer_letter}]] {question.options[right]}: yes, so the answer is "
                f"{question.answer}.")
  return " ".join(checks)


def _truth_xyz(question: mcqa.Question) -> tuple[float, float, float]:
  """The position the right answer names (for movement: the next keyframe)."""
  return question.state_xyz if question.question_type == CURRENT_STATE else question.next_xyz


def _moves(delta: np.ndarray, min_axis_move: float) -> list[str]:
  """Per moving axis "slightly forward 0.023 m": `mcqa.movement_text`'s words and the distance."""
  labels = mcqa.movement_label(delta, min_axis_move)
  if not labels:
    return []
  # movement_text joins one term per label, in the same axis order.
  words = mcqa.movement_text(delta, min_axis_move).split(", ")
  return [f"{word} {format_number(abs(delta[axis]))} m"
          for word, (axis, _, _) in zip(words, labels, strict=True)]


def _expected_answer_text(question: mcqa.Question, config: TargetConfig) -> str:
  """What the right option (or the open-ended answer) must say, from the question's numbers."""
  if question.answer_format == ACTION_TOKENS and question.target_tokens is not None:
    return format_bins(question.target_tokens)
  if question.question_type == MOVEMENT:
    delta = np.subtract(question.next_xyz, question.state_xyz)
    return mcqa.movement_text(delta, config.min_axis_move)
  if question.question_type in (WAYPOINT, CURRENT_STATE):
    return format_xyz(_truth_xyz(question))
  raise ValueError(f"{_describe(question)}: unknown question_type {question.question_type!r}")


def _check_answer(question: mcqa.Question, config: TargetConfig) -> None:
  expected = _expected_answer_text(question, config)
  if question.answer_format == MCQA:
    if (question.answer_letter is None or question.answer_letter not in LETTERS or
        len(question.options) != len(LETTERS) or
        question.answer != f"[[{question.answer_letter}]]"):
      raise ValueError(f"{_describe(question)}: answer {question.answer!r} / letter "
                       f"{question.answer_letter!r} / {len(question.options)} options is not a "
                       "four-option question")
    actual = question.options[LETTERS.index(question.answer_letter)]
  elif question.answer_format in (XYZ, ACTION_TOKENS) and question.question_type != MOVEMENT:
    actual = question.answer
  else:
    raise ValueError(f"{_describe(question)}: answer_format {question.answer_format!r} is not "
                     f"one of ({MCQA!r}, {XYZ!r} or {ACTION_TOKENS!r} for position questions)")
  if actual != expected:
    raise ValueError(
        f"{_describe(question)}: the right answer says {actual!r} but the question's numbers give "
        f"{expected!r}; were the questions extracted with min_axis_move={config.min_axis_move} "
        "(build the TargetConfig from the extractor's manifest)?")


def _describe(question: mcqa.Question) -> str:
  return f"question {question.episode} frame {question.frame} ({question.question_type})"


def _signed(value: float) -> str:
  text = format_number(value)
  return text if text.startswith("-") else "+" + text


def _join(parts: Sequence[str]) -> str:
  """"a", "a and b", "a, b and c"."""
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
