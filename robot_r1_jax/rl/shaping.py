"""Reward shapers and batch filters: registered pieces applied between the reward and the advantages.

    scores = REWARD_SHAPERS[name](scores, lengths, truncated, max_new_tokens, options)   # [B·G]
    keep = BATCH_FILTERS[name](scores.reshape(B, G))                                   # [B] bool

Shapers change each completion's score (host numpy, before the advantage estimator); filters say
which prompts' groups are worth an update, and the learner keeps drawing prompts until the rollout
is full of kept groups (DAPO's dynamic sampling; see `stages.dynamic_sampling`). A user's module
adds either with `register_reward_shaper` / `register_batch_filter` (loaded with `--import`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class ShapingOptions:
  """Constants of the shapers.

  Attributes:
    overlong_buffer: DAPO's L_cache, in tokens: completions longer than max_new_tokens − this are
      penalised linearly, down to −overlong_penalty at max_new_tokens.
    overlong_penalty: the penalty at the full budget (DAPO: 1).
  """

  overlong_buffer: int = 0
  overlong_penalty: float = 1.0

  def __post_init__(self):
    if self.overlong_buffer < 0:
      raise ValueError(f"ShapingOptions.overlong_buffer={self.overlong_buffer} must be >= 0")
    if not (math.isfinite(self.overlong_penalty) and self.overlong_penalty >= 0):
      raise ValueError(f"ShapingOptions.overlong_penalty={self.overlong_penalty} must be >= 0")


# (scores [N] f32, lengths [N] int, truncated [N] bool, max_new_tokens, options) -> scores [N] f32
RewardShaper = Callable[[np.ndarray, np.ndarray, np.ndarray, int, ShapingOptions], np.ndarray]
# scores [B, G] f32 -> keep [B] bool
BatchFilter = Callable[[np.ndarray], np.ndarray]

REWARD_SHAPERS: dict[str, RewardShaper] = {}
BATCH_FILTERS: dict[str, BatchFilter] = {}


def _registrar(registry: dict, kind: str, name: str):

  def add(fn):
    if name in registry:
      raise ValueError(f"a {kind} named {name!r} is already registered")
    registry[name] = fn
    return fn

  return add


def register_reward_shaper(name: str) -> Callable[[RewardShaper], RewardShaper]:
  """Decorator: adds `fn(scores, lengths, truncated, max_new_tokens, options) -> scores` as the
  reward shaper `name` (`LearnerConfig.reward_shapers`, `--reward_shapers`)."""
  return _registrar(REWARD_SHAPERS, "reward shaper", name)


def register_batch_filter(name: str) -> Callable[[BatchFilter], BatchFilter]:
  """Decorator: adds `fn(scores [B, G]) -> keep [B]` as the batch filter `name`
  (`LearnerConfig.batch_filter`, `--batch_filter`)."""
  return _registrar(BATCH_FILTERS, "batch filter", name)


def check_names(registry: dict, kind: str, names: tuple[str, ...]) -> None:
  unknown = [n for n in names if n not in registry]
  if unknown:
    raise ValueError(f"unknown {kind} {', '.join(map(repr, unknown))}; choose from "
                     f"{sorted(registry)}")


@register_reward_shaper("overlong")
def overlong(scores: np.ndarray, lengths: np.ndarray, truncated: np.ndarray, max_new_tokens: int,
             options: ShapingOptions) -> np.ndarray:
  """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): with L = max_new_tokens and
  L_cache = overlong_buffer, a completion of |y| tokens gets
    0 for |y| ≤ L − L_cache,   −(|y| − (L − L_cache)) / L_cache · penalty up to |y| = L,
  added to its score. `truncated` is not needed: the budget bounds |y|."""
  del truncated
  if options.overlong_buffer == 0:
    raise ValueError("the 'overlong' reward shaper needs overlong_buffer > 0 (--overlong_buffer)")
  excess = np.asarray(lengths, np.float32) - (max_new_tokens - options.overlong_buffer)
  penalty = np.clip(excess / options.overlong_buffer, 0.0, 1.0) * options.overlong_penalty
  return (np.asarray(scores, np.float32) - penalty).astype(np.float32)


@register_batch_filter("informative")
def informative(scores: np.ndarray) -> np.ndarray:
  """DAPO's dynamic sampling (Yu et al. 2025): keep groups whose rewards are not all equal, the
  ones a group-relative advantage does not zero out."""
  scores = np.asarray(scores)
  return (scores != scores[:, :1]).any(axis=1)
