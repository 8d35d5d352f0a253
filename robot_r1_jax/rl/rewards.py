"""Rule-based rewards for Robot-R1 completions: format, multiple-choice answer, position distance.

A completion is expected to look like `<think> … </think> <answer> [[B]] </answer>`. Each reward
component is computed independently (the paper's total is r_format + r_answer), so the trainer can
log them separately and ablate their weights. Every function here is total: any string, however
malformed, long or exotic, gets a reward in [0, 1] and never raises. Only the *reference* answers
are validated (they come from our own data pipeline, so a bad one is a bug worth a loud error).

Matching is deliberately strict, because RL finds every loophole a lenient matcher leaves:
  * Tags are the exact, case-sensitive strings `<think>`, `</think>`, `<answer>`, `</answer>`.
  * An option answer is the block content `[[X]]` (X an uppercase ASCII letter) and nothing else
    besides surrounding whitespace: "A", "[[A]] or [[B]]", "[[A]] because …" all score 0.
  * Coordinates are `[x, y, z]` with plain decimal numbers (ASCII digits, optional sign and
    fraction); exponents, `nan`, `inf`, `1_0` and non-ASCII digits are rejected even though Python's
    `float` would accept them.
  * Action tokens (RT-2) are three bin numbers separated by whitespace, `147 130 21`: ASCII digits
    only, nothing else in the block.

Open-ended answers (a position or its bins) score in the `xyz` component:
  * `[x, y, z]`: clip(1 − ‖pred − true‖₁ / 1 m, 0, 1);
  * bins: exp(−Σ|pred_bin − true_bin| / BIN_SCALE), BIN_SCALE = 16 bins: 1 at the right bins,
    0.94 one bin off on one axis, 0.37 at 16 bins (about 6 cm at 256 bins over a metre), ≈0.002
    at 100. Bin distance rather than metres because the bins are what the model writes; the scale is
    stated in bins for RT-2's 256 per axis.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# `[A-Z]` and `[0-9]` rather than `\w`/`\d`: those match non-ASCII letters and digits.
_OPTION = re.compile(r"\[\[([A-Z])\]\]")
_BARE_OR_MARKED_OPTION = re.compile(r"\s*(?:\[\[([A-Z])\]\]|([A-Z]))\s*")
_NUMBER = r"([-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
_XYZ = re.compile(rf"\s*\[\s*{_NUMBER}\s*,\s*{_NUMBER}\s*,\s*{_NUMBER}\s*\]\s*")
_BINS = re.compile(r"\s*([0-9]+)\s+([0-9]+)\s+([0-9]+)\s*")
BIN_SCALE = 16.0


@dataclasses.dataclass(frozen=True)
class RewardWeights:
  """Weights of the reward components in the total (the paper uses r_format + r_answer)."""

  format: float = 1.0
  answer: float = 1.0
  xyz: float = 1.0

  def __post_init__(self):
    for name in ("format", "answer", "xyz"):
      value = getattr(self, name)
      if not math.isfinite(value):
        raise ValueError(f"RewardWeights.{name}={value} must be finite")


@dataclasses.dataclass(frozen=True)
class RewardOutput:
  """Per-completion rewards, one float32 entry per completion [B·G], split by component.

  `answer` is 0 for open-ended questions (a position or its bins) and `xyz`, their position reward,
  is 0 for multiple-choice ones; `open_ended` says which applies, so accuracies can be logged over
  the right subset.
  """

  format: np.ndarray  # [B·G] f32
  answer: np.ndarray  # [B·G] f32
  xyz: np.ndarray  # [B·G] f32
  open_ended: np.ndarray  # [B·G] bool
  total: np.ndarray  # [B·G] f32

  def summary(self) -> dict[str, float]:
    """Means for logging; a component over a subset that is empty in this batch is left out."""
    out = {"reward/total": float(self.total.mean()), "reward/format": float(self.format.mean())}
    if (~self.open_ended).any():
      out["reward/answer"] = float(self.answer[~self.open_ended].mean())
    if self.open_ended.any():
      out["reward/xyz"] = float(self.xyz[self.open_ended].mean())
    return out


def format_reward(text: str) -> float:
  """1.0 iff `text` is exactly one think block followed by exactly one answer block, else 0.0.

  Only whitespace may surround the two blocks and separate them. Either block's content may be
  anything (including empty) that contains none of the four tags, so nested or repeated tags fail.
  """
  if any(text.count(tag) != 1 for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)):
    return 0.0
  body = text.strip()
  if not (body.startswith(THINK_OPEN) and body.endswith(ANSWER_CLOSE)):
    return 0.0
  think_end = body.find(THINK_CLOSE)
  answer_start = body.find(ANSWER_OPEN)
  if answer_start < think_end:
    return 0.0
  return 1.0 if not body[think_end + len(THINK_CLOSE):answer_start].strip() else 0.0


def answer_block(text: str) -> str | None:
  """The content of the single `<answer>…</answer>` block, or None if there is not exactly one."""
  if text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1:
    return None
  start = text.find(ANSWER_OPEN) + len(ANSWER_OPEN)
  end = text.find(ANSWER_CLOSE)
  return text[start:end] if start <= end else None


def parse_option(answer: str) -> str:
  """The option letter of a reference answer given as "B" or "[[B]]" (surrounding space allowed).

  Raises:
    ValueError: `answer` is neither form.
  """
  match = _BARE_OR_MARKED_OPTION.fullmatch(answer) if isinstance(answer, str) else None
  if match is None:
    raise ValueError(f"answer={answer!r} is not an option: expected 'A'…'Z' or '[[A]]'…'[[Z]]'")
  return match.group(1) or match.group(2)


def answer_reward(text: str, answer: str) -> float:
  """1.0 iff the single answer block of `text` is exactly the option `answer`, else 0.0.

  Args:
    text: a model completion.
    answer: the right option, as "B" or "[[B]]" (both accepted; see `parse_option`).

  Raises:
    ValueError: `answer` is not an option (the completion itself never raises).
  """
  letter = parse_option(answer)
  return 1.0 if chosen_option(text) == letter else 0.0


def chosen_option(text: str) -> str | None:
  """The option letter a completion answers: its single answer block is exactly `[[X]]`; else
  None (no answer, several blocks, or anything besides the one option)."""
  content = answer_block(text)
  match = None if content is None else _OPTION.fullmatch(content.strip())
  return None if match is None else match.group(1)


def answered_xyz(text: str) -> tuple[float, float, float] | None:
  """The position `[x, y, z]` a completion's single answer block holds, or None."""
  content = answer_block(text)
  return None if content is None else _parse_xyz(content)


def answered_bins(text: str) -> tuple[int, int, int] | None:
  """The three bin numbers a completion's single answer block holds, or None."""
  content = answer_block(text)
  match = None if content is None else _BINS.fullmatch(content)
  return None if match is None else tuple(int(g) for g in match.groups())


def is_bins(answer: str) -> bool:
  """Whether a reference answer is action tokens ("147 130 21")."""
  return isinstance(answer, str) and _BINS.fullmatch(answer) is not None


def parse_bins(target: str) -> tuple[int, int, int]:
  """A reference's three bin numbers ("147 130 21").

  Raises:
    ValueError: `target` is not three bin numbers.
  """
  match = _BINS.fullmatch(target) if isinstance(target, str) else None
  if match is None:
    raise ValueError(f"target={target!r} is not action tokens: expected three bin numbers 'i j k'")
  return tuple(int(g) for g in match.groups())


def bins_reward(text: str, target: str) -> float:
  """exp(−(L1 bin distance) / BIN_SCALE) for the bins in the single answer block, else 0.0.

  Raises:
    ValueError: `target` is not three bin numbers (the completion itself never raises).
  """
  true = parse_bins(target)
  pred = answered_bins(text)
  if pred is None:
    return 0.0
  return math.exp(-sum(abs(p - t) for p, t in zip(pred, true)) / BIN_SCALE)


def _parse_xyz(content: str) -> tuple[float, float, float] | None:
  match = _XYZ.fullmatch(content)
  if match is None:
    return None
  xyz = tuple(float(g) for g in match.groups())
  # A long digit string parses to inf; it is not a position.
  return xyz if all(math.isfinite(v) for v in xyz) else None


def parse_xyz(target: str | Sequence[float]) -> tuple[float, float, float]:
  """A reference position from "[x, y, z]" or a sequence of three finite numbers.

  Raises:
    ValueError: `target` is neither.
  """
  if isinstance(target, str):
    xyz = _parse_xyz(target)
  else:
    try:
      xyz = tuple(float(v) for v in target)
    except (TypeError, ValueError):
      xyz = None
    if xyz is not None and (len(xyz) != 3 or not all(math.isfinite(v) for v in xyz)):
      xyz = None
  if xyz is None:
    raise ValueError(f"target={target!r} is not a position: expected '[x, y, z]' or three finite "
                     "numbers")
  return xyz


def xyz_reward(text: str, target: str | Sequence[float]) -> float:
  """clip(1 − ‖pred − target‖₁, 0, 1) for the `[x, y, z]` in the single answer block, else 0.0.

  Args:
    text: a model completion.
    target: the true position (metres), "[x, y, z]" or three numbers.

  Raises:
    ValueError: `target` is not a position (the completion itself never raises).
  """
  true = parse_xyz(target)
  pred = answered_xyz(text)
  if pred is None:
    return 0.0
  l1 = sum(abs(p - t) for p, t in zip(pred, true))
  return min(max(1.0 - l1, 0.0), 1.0)


def compute_rewards(texts: Sequence[str], answers: Sequence[str],
                    weights: RewardWeights = RewardWeights()) -> RewardOutput:
  """Rewards for a batch of completions.

  Args:
    texts: the B·G completions.
    answers: B·G references: an option ("B" / "[[B]]") for multiple-choice questions; for
      open-ended ones a position "[x, y, z]" (`xyz_reward`) or bins "147 130 21" (`bins_reward`).
    weights: weights of the components in `total`.

  Raises:
    ValueError: the lengths differ, or a reference is neither an option nor a position.
  """
  if len(texts) != len(answers):
    raise ValueError(f"texts has {len(texts)} entries but answers has {len(answers)}")
  n = len(texts)
  fmt, ans, xyz = np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32)
  open_ended = np.zeros(n, bool)
  for i, (text, answer) in enumerate(zip(texts, answers)):
    fmt[i] = format_reward(text)
    if isinstance(answer, str) and _BARE_OR_MARKED_OPTION.fullmatch(answer):
      ans[i] = answer_reward(text, answer)
    elif is_bins(answer):
      xyz[i] = bins_reward(text, answer)
      open_ended[i] = True
    else:
      try:
        xyz[i] = xyz_reward(text, answer)
      except ValueError:
        raise ValueError(f"answers[{i}]={answer!r} is neither an option ('B' or '[[B]]') nor a "
                         "position ('[x, y, z]') nor bins ('147 130 21')") from None
      open_ended[i] = True
  total = (weights.format * fmt + weights.answer * ans + weights.xyz * xyz).astype(np.float32)
  return RewardOutput(format=fmt, answer=ans, xyz=xyz, open_ended=open_ended, total=total)
