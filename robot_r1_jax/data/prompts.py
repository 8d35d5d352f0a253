"""The Robot-R1 prompt text: the paper's sections, in the paper's order, in our own words.

Sections: role; task; visual input; coordinate system (with the table-top origin for position
questions); robot specification (position questions only); current robot state (waypoint and
movement questions); the question with its options; the output format. The text is the user
message; the image itself is placed by the chat template, and the prompt refers to it as the
"front view of the workspace" (or the chosen camera's view).

The `compact` style keeps only the sections that differ between questions (task, current robot
state, question with options). It is for learning runs of small models trained from scratch on a
CPU: the paper prompt's fixed sections are about half of its ~430 tokens under the tiny tokenizer,
text such a model only learns to ignore, and they make a direct-SFT step of the tiny model take
0.75 s instead of 0.3 s.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

WAYPOINT, CURRENT_STATE, MOVEMENT = "waypoint", "current_state", "movement"
QUESTION_TYPES = (WAYPOINT, CURRENT_STATE, MOVEMENT)
MCQA, XYZ, ACTION_TOKENS = "mcqa", "xyz", "action_tokens"
ANSWER_FORMATS = (MCQA, XYZ, ACTION_TOKENS)
PAPER, COMPACT = "paper", "compact"
PROMPT_STYLES = (PAPER, COMPACT)
LETTERS = "ABCD"


@dataclasses.dataclass(frozen=True)
class Workspace:
  """The valid gripper positions (world frame, metres): PerAct's scene bounds above the table."""

  low: tuple[float, float, float] = (-0.3, -0.5, 0.752)
  high: tuple[float, float, float] = (0.7, 0.5, 1.6)

  def __post_init__(self):
    if len(self.low) != 3 or len(self.high) != 3 or any(
        lo >= hi for lo, hi in zip(self.low, self.high)):
      raise ValueError(f"Workspace low={self.low} must be below high={self.high} on all 3 axes")


@dataclasses.dataclass(frozen=True)
class ActionBins:
  """RT-2's action tokens for a position: each workspace axis cut into `count` equal bins."""

  workspace: Workspace
  count: int = 256


@dataclasses.dataclass(frozen=True)
class RobotMetadata:
  """Facts the prompt states about the scene and the robot (Robot-R1's RLBench values)."""

  table_origin: tuple[float, float, float] = (0.25, 0.0, 0.752)  # Table-top centre, world frame.
  gripper_size: tuple[float, float, float] = (0.06, 0.2, 0.09)  # Metres along x, y, z.
  finger_length: float = 0.04


def format_number(value: float) -> str:
  """3 decimals, with no '-0.000'."""
  text = f"{value:.3f}"
  return "0.000" if text == "-0.000" else text


def format_xyz(xyz: Sequence[float]) -> str:
  return "[" + ", ".join(format_number(v) for v in xyz) + "]"


def format_bins(bins: Sequence[int]) -> str:
  """An action-token answer: the three bin indices, space-separated as RT-2 writes actions."""
  return " ".join(str(int(b)) for b in bins)


_QUESTIONS = {
    WAYPOINT: "Which position should the gripper reach next (the next keyframe) to make progress "
              "on the task?",
    CURRENT_STATE: "Where is the gripper now, judging from the image?",
    MOVEMENT: "In which directions should the gripper move to reach the next keyframe?",
}


def render_prompt(question_type: str, *, description: str, camera: str,
                  state_xyz: Sequence[float], options: Sequence[str] | None,
                  metadata: RobotMetadata, style: str = PAPER,
                  action_bins: ActionBins | None = None) -> str:
  """The user-message text of one question.

  Args:
    question_type: one of QUESTION_TYPES.
    description: the task description (a variation description, e.g. "pick up the red cup").
    camera: the camera whose image accompanies the prompt.
    state_xyz: the gripper position now (printed for waypoint and movement questions).
    options: the four option texts in letter order, or None for an open-ended answer: a position
      [x, y, z], or its bins (`action_bins`).
    metadata: table and gripper facts.
    style: `PAPER`, or `COMPACT` (see the module doc).
    action_bins: for an open-ended answer, ask for the position's bins instead (stated in the
      question, in both styles: the answer means nothing without them).
  """
  if question_type not in QUESTION_TYPES:
    raise ValueError(f"question_type={question_type!r}; expected one of {QUESTION_TYPES}")
  if style not in PROMPT_STYLES:
    raise ValueError(f"prompt style={style!r}; expected one of {PROMPT_STYLES}")
  paper = style == PAPER
  positional = question_type != MOVEMENT
  task = f"## Task\n{_sentence(description)}"
  sections = [
      "You are the planning assistant of a Franka Emika Panda robot arm: you plan and carry out "
      "manipulation tasks step by step.",
      task,
      f"## Visual input\nThe image is the {_view(camera)}.",
      _coordinates(metadata if positional else None),
  ] if paper else [task]
  if positional and paper:
    size = metadata.gripper_size
    sections.append(
        f"## Robot specification\nThe gripper measures {size[0]:g} m along x, {size[1]:g} m along "
        f"y and {size[2]:g} m along z; each finger is {metadata.finger_length:g} m long.")
  if question_type != CURRENT_STATE:
    sections.append(f"## Current robot state\nPosition: {format_xyz(state_xyz)}")
  question = _QUESTIONS[question_type]
  if options is None and action_bins is not None:
    sections.append(f"## Question\n{question} {_bins_statement(action_bins)}")
    example, what = format_bins([action_bins.count // 2] * 3), "the three bin numbers"
  elif options is None:
    sections.append(f"## Question\n{question} Answer with a position [x, y, z] in metres with 3 "
                    "decimals.")
    example, what = "[x, y, z]", "the position"
  else:
    if len(options) != len(LETTERS):
      raise ValueError(f"expected {len(LETTERS)} options, got {len(options)}")
    lines = "\n".join(f"[[{letter}]] {text}" for letter, text in zip(LETTERS, options))
    sections.append(f"## Question\n{question}\n{lines}")
    example, what = "[[A]]", "the chosen option"
  if paper:
    sections.append(
        f"## Output format\nReason step by step inside <think> </think>, then give {what} inside "
        f"<answer> </answer>. For example:\n<think> ... </think> <answer> {example} </answer>")
  return "\n\n".join(sections)


def _bins_statement(bins: ActionBins) -> str:
  low, high = bins.workspace.low, bins.workspace.high
  ranges = ", ".join(f"{axis} from {format_number(lo)} to {format_number(hi)} m"
                     for axis, lo, hi in zip("xyz", low, high))
  return (f"Answer with the position as three bin numbers \"x y z\": each axis of the workspace "
          f"({ranges}) is cut into {bins.count} equal bins, numbered 0 to {bins.count - 1} from "
          "its low end.")


def _coordinates(metadata: RobotMetadata | None) -> str:
  text = "## Coordinate system\nPositions are world coordinates [x, y, z] in metres."
  if metadata is not None:
    text += f" The centre of the table top is at {format_xyz(metadata.table_origin)}."
  return text + ("\n- x: front (+) / back (-)\n- y: left (-) / right (+)\n- z: down (-) / up (+)")


def _view(camera: str) -> str:
  return "front view of the workspace" if camera == "front" else (
      f"{camera.replace('_', ' ')} camera view of the workspace")


def _sentence(text: str) -> str:
  text = " ".join(text.split())
  if not text:
    raise ValueError("the task description is empty")
  text = text[0].upper() + text[1:]
  return text if text[-1] in ".!?" else text + "."
