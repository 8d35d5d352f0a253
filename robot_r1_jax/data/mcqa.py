"""Robot-R1 questions cut from a demo: waypoint, current state and movement, four options each.

For each segment between keyframes (the first starts at frame 0), frames are sampled every
`frame_interval` frames from the segment's start, strictly before its keyframe; each sampled frame
asks about the state there and the next keyframe:

* waypoint: image + current xyz -> the next keyframe's xyz; 3 distractors drawn uniformly from the
  workspace, at least `min_separation` from the truth and from each other (so no two options print
  alike at 3 decimals).
* current state: image -> the current xyz; distractors as above.
* movement: image + current xyz -> direction words from Δ = next − current per axis (x forward /
  backward, y left / right, z down / up); an axis is "slightly" when |Δ_axis| <= ½·max|Δ| and is
  left out when |Δ_axis| < `min_axis_move`. Distractors are neighbouring movements (one axis's sign
  flipped, "slightly" toggled, an axis dropped or added), never the truth and never all "slightly"
  (no Δ produces that, so it would be a giveaway).

Options are shuffled with a generator seeded from (seed, task, episode, frame, question type), so a
question is a pure function of its inputs and the right letter is uniform over A–D. Position
questions also carry their metric target (for an L1 reward on open-ended answers) and its RT-2
style discretisation (`action_bins` bins per axis over the workspace), which is the answer itself
with `answer_format="action_tokens"` (three bin numbers, "147 130 21"; the prompt states the bins).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from typing import Any, Sequence

import numpy as np

from robot_r1_jax.data.demo import Demo, DemoError
from robot_r1_jax.data.prompts import (ACTION_TOKENS, ANSWER_FORMATS, CURRENT_STATE, LETTERS, MCQA,
                                       MOVEMENT, PAPER, PROMPT_STYLES, QUESTION_TYPES, WAYPOINT,
                                       ActionBins, RobotMetadata, Workspace, format_bins,
                                       format_xyz, render_prompt)

XYZ3 = tuple[float, float, float]
_AXIS_WORDS = (("backward", "forward"), ("left", "right"), ("down", "up"))  # (negative, positive)


@dataclasses.dataclass(frozen=True)
class McqaConfig:
  """How questions are cut and worded."""

  frame_interval: int = 10  # t: sample a state every t frames before the next keyframe.
  question_types: tuple[str, ...] = QUESTION_TYPES
  # "mcqa" (options [[A]]…[[D]]), "xyz" (an open-ended position) or "action_tokens" (its bins).
  answer_format: str = MCQA
  workspace: Workspace = Workspace()
  min_separation: float = 0.05  # Metres between any two position options.
  min_axis_move: float = 1e-3  # Metres; smaller |Δ_axis| is jitter, not a direction.
  action_bins: int = 256  # per axis over `workspace` (RT-2's action tokens)
  metadata: RobotMetadata = RobotMetadata()
  prompt_style: str = PAPER  # "paper", or "compact" for CPU-scale learning runs (see `prompts`).

  def __post_init__(self):
    if self.prompt_style not in PROMPT_STYLES:
      raise ValueError(f"prompt_style={self.prompt_style!r}: choose from {PROMPT_STYLES}")
    if self.frame_interval < 1:
      raise ValueError(f"frame_interval={self.frame_interval} must be >= 1")
    bad = [t for t in self.question_types if t not in QUESTION_TYPES]
    if bad or not self.question_types:
      raise ValueError(f"question_types={self.question_types}: choose from {QUESTION_TYPES}")
    if self.answer_format not in ANSWER_FORMATS:
      raise ValueError(f"answer_format={self.answer_format!r}: choose from {ANSWER_FORMATS}")
    # Below 2 mm, two options could round to the same printed 3-decimal position.
    if self.min_separation < 0.002:
      raise ValueError(f"min_separation={self.min_separation} must be >= 0.002 m")
    if self.min_axis_move < 0 or self.action_bins < 2:
      raise ValueError(f"min_axis_move={self.min_axis_move} must be >= 0 and action_bins="
                       f"{self.action_bins} >= 2")

  @property
  def bins(self) -> ActionBins:
    return ActionBins(self.workspace, self.action_bins)

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> McqaConfig:
    """Inverse of `dataclasses.asdict` (also after JSON, as in an extractor's manifest.json)."""
    data = dict(data)
    workspace = data.pop("workspace", None)
    metadata = data.pop("metadata", None)
    fields = {f.name for f in dataclasses.fields(cls)}
    if set(data) - fields:
      raise ValueError(f"unknown question settings {sorted(set(data) - fields)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()},
               **({} if workspace is None else {"workspace": Workspace(
                   **{k: tuple(v) for k, v in workspace.items()})}),
               **({} if metadata is None else {"metadata": RobotMetadata(
                   **{k: tuple(v) if isinstance(v, list) else v for k, v in metadata.items()})}))


@dataclasses.dataclass(frozen=True)
class FrameContext:
  """Everything a question depends on besides the seed and the config."""

  task: str
  episode: str  # A stable episode id, e.g. "pick_up_cup/variation0/episode3".
  frame: int
  next_keyframe: int
  description: str
  state_xyz: XYZ3
  next_xyz: XYZ3
  camera: str = "front"


@dataclasses.dataclass(frozen=True)
class Question:
  """One question, ready to serialise (see `to_dict`)."""

  prompt: str  # The user message text.
  options: tuple[str, ...]  # Option texts in letter order; () for open-ended questions.
  # What must appear inside <answer></answer>: "[[B]]", "[x, y, z]" or bins "128 64 201".
  answer: str
  answer_letter: str | None  # "B"; None for open-ended questions.
  question_type: str
  answer_format: str
  task: str
  episode: str
  frame: int
  next_keyframe: int
  description: str
  camera: str
  state_xyz: XYZ3
  next_xyz: XYZ3
  target_xyz: XYZ3 | None  # The true position for position questions; None for movement.
  target_tokens: tuple[int, int, int] | None  # target_xyz in `action_bins` bins per axis.

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> Question:
    """Inverse of `to_dict` (also after a JSON round trip, which turns tuples into lists)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    if set(data) != fields:
      raise ValueError(f"question fields differ: missing {sorted(fields - set(data))}, unknown "
                       f"{sorted(set(data) - fields)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def question_frames(keyframes: Sequence[int], frame_interval: int) -> list[tuple[int, int]]:
  """(frame, next keyframe) pairs: every `frame_interval` frames from each segment's start."""
  pairs = []
  start = 0
  for keyframe in keyframes:
    pairs.extend((frame, keyframe) for frame in range(start, keyframe, frame_interval))
    start = keyframe
  return pairs


def episode_questions(demo: Demo, keyframes: Sequence[int], *, task: str, episode: str,
                      description: str, seed: int, config: McqaConfig,
                      camera: str = "front") -> list[Question]:
  """All questions of one episode, ordered by frame then by `config.question_types`."""
  questions = []
  for frame, keyframe in question_frames(keyframes, config.frame_interval):
    ctx = FrameContext(task=task, episode=episode, frame=frame, next_keyframe=keyframe,
                       description=description, state_xyz=gripper_xyz(demo, frame),
                       next_xyz=gripper_xyz(demo, keyframe), camera=camera)
    for question_type in config.question_types:
      question = build_question(question_type, ctx, seed=seed, config=config)
      if question is not None:
        questions.append(question)
  return questions


def gripper_xyz(demo: Demo, i: int) -> XYZ3:
  """The end-effector position (gripper_pose[:3]) of step i."""
  pose = demo[i].gripper_pose
  if pose is None or np.shape(pose) != (7,) or not np.all(np.isfinite(pose)):
    raise DemoError(f"observation {i} has no finite 7-d gripper_pose (got {pose!r})")
  return tuple(float(v) for v in pose[:3])


def build_question(question_type: str, ctx: FrameContext, *, seed: int,
                   config: McqaConfig) -> Question | None:
  """One question of `question_type` about `ctx`, or None when there is none to ask.

  None is returned for a movement question when the gripper does not move (every |Δ_axis| below
  `min_axis_move`) or when the answer format is open-ended (movement has no position answer).
  """
  if question_type == MOVEMENT:
    truth = movement_label(np.subtract(ctx.next_xyz, ctx.state_xyz), config.min_axis_move)
    if not truth or config.answer_format != MCQA:
      return None
    candidates = [_movement_text(truth)] + [_movement_text(m) for m in _movement_distractors(
        truth, _rng(seed, ctx, question_type), 3)]
    target = None
  elif question_type in (WAYPOINT, CURRENT_STATE):
    target = ctx.next_xyz if question_type == WAYPOINT else ctx.state_xyz
    candidates = [format_xyz(target)] + [format_xyz(p) for p in _position_distractors(
        target, _rng(seed, ctx, question_type), config)]
  else:
    raise ValueError(f"question_type={question_type!r}; expected one of {QUESTION_TYPES}")

  if config.answer_format == MCQA:
    order = _rng(seed, ctx, question_type, "shuffle").permutation(len(candidates))
    options = tuple(candidates[j] for j in order)
    letter = LETTERS[int(np.flatnonzero(order == 0)[0])]
    answer = f"[[{letter}]]"
  else:
    tokens = config.answer_format == ACTION_TOKENS
    options, letter = (), None
    answer = (format_bins(discretize(target, config.workspace, config.action_bins)) if tokens
              else format_xyz(target))
  assert len(set(options)) == len(options), f"duplicate options {options}"  # By construction.
  prompt = render_prompt(question_type, description=ctx.description, camera=ctx.camera,
                         state_xyz=ctx.state_xyz, options=options or None,
                         metadata=config.metadata, style=config.prompt_style,
                         action_bins=config.bins if config.answer_format == ACTION_TOKENS
                         else None)
  return Question(
      prompt=prompt, options=options, answer=answer, answer_letter=letter,
      question_type=question_type, answer_format=config.answer_format, task=ctx.task,
      episode=ctx.episode, frame=ctx.frame, next_keyframe=ctx.next_keyframe,
      description=ctx.description, camera=ctx.camera, state_xyz=tuple(ctx.state_xyz),
      next_xyz=tuple(ctx.next_xyz), target_xyz=None if target is None else tuple(target),
      target_tokens=None if target is None else discretize(target, config.workspace,
                                                           config.action_bins))


# ------------------------------------------------------------------------------------------------
# Movement words.

Movement = tuple[tuple[int, int, bool], ...]  # ((axis, sign ±1, slightly), …) in axis order.


def movement_label(delta: Sequence[float], min_axis_move: float = 1e-3) -> Movement:
  """Δ per axis -> direction terms; "slightly" iff |Δ_axis| <= ½·max|Δ|. Empty if no axis moves."""
  delta = np.asarray(delta, np.float64)
  largest = float(np.max(np.abs(delta)))
  return tuple((axis, 1 if d > 0 else -1, bool(abs(d) <= 0.5 * largest))
               for axis, d in enumerate(delta) if abs(d) >= min_axis_move and d != 0)


def movement_text(delta: Sequence[float], min_axis_move: float = 1e-3) -> str:
  """The words for Δ, e.g. (0.1, -0.05, 0.02) -> "forward, slightly left, slightly up"."""
  return _movement_text(movement_label(delta, min_axis_move))


def _movement_text(movement: Movement) -> str:
  return ", ".join(("slightly " if slight else "") + _AXIS_WORDS[axis][sign > 0]
                   for axis, sign, slight in movement)


def _movement_distractors(truth: Movement, rng: np.random.Generator, count: int) -> list[Movement]:
  """`count` distinct one-edit neighbours of `truth`, seeded."""
  terms = list(truth)
  neighbours = set()
  for i, (axis, sign, slight) in enumerate(terms):
    neighbours.add(tuple(terms[:i] + [(axis, -sign, slight)] + terms[i + 1:]))
    neighbours.add(tuple(terms[:i] + [(axis, sign, not slight)] + terms[i + 1:]))
    neighbours.add(tuple(terms[:i] + terms[i + 1:]))
  present = {axis for axis, _, _ in terms}
  for axis, sign, slight in itertools.product(range(3), (-1, 1), (False, True)):
    if axis not in present:
      neighbours.add(tuple(sorted(terms + [(axis, sign, slight)])))
  valid = sorted(m for m in neighbours
                 if m and m != truth and not all(slight for _, _, slight in m))
  if len(valid) < count:
    raise AssertionError(f"only {len(valid)} neighbours of {truth}")  # >= 6 for any valid truth.
  return [valid[j] for j in rng.choice(len(valid), size=count, replace=False)]


# ------------------------------------------------------------------------------------------------
# Positions.


def _position_distractors(truth: Sequence[float], rng: np.random.Generator,
                          config: McqaConfig) -> list[np.ndarray]:
  """3 workspace samples at printed precision, pairwise and from the truth >= min_separation."""
  chosen = [np.round(np.asarray(truth, np.float64), 3)]
  low, high = config.workspace.low, config.workspace.high
  for _ in range(10_000):
    sample = np.round(rng.uniform(low, high), 3)
    if all(np.linalg.norm(sample - c) >= config.min_separation for c in chosen):
      chosen.append(sample)
      if len(chosen) == 4:
        return chosen[1:]
  raise ValueError(f"cannot place 3 distractors {config.min_separation} m apart in workspace "
                   f"{config.workspace}; lower min_separation or widen the workspace")


def discretize(xyz: Sequence[float], workspace: Workspace, bins: int = 256) -> tuple[int, int, int]:
  """RT-2 style tokens: each axis's [low, high] in `bins` equal bins (clipped at the ends)."""
  low, high = np.asarray(workspace.low), np.asarray(workspace.high)
  index = np.floor((np.asarray(xyz, np.float64) - low) / (high - low) * bins)
  return tuple(int(v) for v in np.clip(index, 0, bins - 1))


def undiscretize(tokens: Sequence[int], workspace: Workspace, bins: int = 256) -> XYZ3:
  """The centres of the bins `tokens` name."""
  low, high = np.asarray(workspace.low), np.asarray(workspace.high)
  return tuple(float(v) for v in low + (np.asarray(tokens) + 0.5) / bins * (high - low))


def _rng(seed: int, ctx: FrameContext, *salt: str) -> np.random.Generator:
  # A digest rather than hash(): identical across processes and Python runs.
  key = "\x1f".join(map(str, (seed, ctx.task, ctx.episode, ctx.frame) + salt)).encode()
  return np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:16], "little"))
