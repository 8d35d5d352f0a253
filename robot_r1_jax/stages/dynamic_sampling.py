"""Dynamic sampling (DAPO, Yu et al. 2025): draw prompts until the rollout is full of groups a
batch filter keeps, then train on exactly the rollout's number of prompts.

Each draw is a loader batch rolled out and rewarded as usual (a `Rollout`). Groups are picked in
draw order; when the draws run out (`max_draws`, or the data) before every process has enough,
the rest is filled with groups the filter refused, in draw order, and the metrics say how many.
Every process keeps the same number of prompts, so the merged rows form one global batch, and all
processes draw the same number of times (the sampler is a collective), agreeing on the counts.

Dimensions: B prompts · G samples per prompt · T prompt bucket · R completion bucket · P patches
per image.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from robot_r1_jax.generate.sampler import SamplerOutput
from robot_r1_jax.model import sharding
from robot_r1_jax.rl import rewards


@dataclasses.dataclass(frozen=True)
class Rollout:
  """One loader batch with its G completions per prompt and their (shaped) rewards."""

  batch: Any  # data.loader.Batch of this process's B prompts
  out: SamplerOutput  # B·G rows (global arrays)
  reward: rewards.RewardOutput  # this process's B·G rows


def fill(first: Rollout, keep: Callable[[Rollout], np.ndarray],
         more: Callable[[int], Rollout | None], max_draws: int, group_size: int, mesh: Mesh
         ) -> tuple[Rollout, dict[str, float]]:
  """`first` and as many further draws (`more(d)` for d = 1, 2, …; None when the data ran out) as
  it takes for every process to hold B kept groups, at most `max_draws` draws in all.

  Returns the merged rollout of B prompts per process and the metrics `dynamic_sampling/draws`,
  `/kept_fraction` (over every drawn group) and `/refused_in_batch` (refused groups used to fill).
  """
  need = len(first.batch.input_ids)
  rollouts, kept = [first], [keep(first)]
  while len(rollouts) < max_draws and _fewest(sum(int(k.sum()) for k in kept)) < need:
    drawn = more(len(rollouts))
    if drawn is None:
      break
    rollouts.append(drawn)
    kept.append(keep(drawn))
  picks = [(d, b) for d, k in enumerate(kept) for b in np.flatnonzero(k)][:need]
  refused = [(d, b) for d, k in enumerate(kept) for b in np.flatnonzero(~k)]
  filled = need - len(picks)
  picks += refused[:filled]
  picks.sort()  # draw order, then prompt order: the first draw's rows stay first
  kept_count, drawn, refused_in_batch = (float(x) for x in _all_processes(np.array(
      [sum(k.sum() for k in kept), sum(len(k) for k in kept), filled], np.float64)))
  # Python floats: metrics go into the checkpoint's JSON meta (numpy float32 does not serialise).
  metrics = {"dynamic_sampling/draws": float(len(rollouts)),
             "dynamic_sampling/kept_fraction": kept_count / max(drawn, 1.0),
             "dynamic_sampling/refused_in_batch": refused_in_batch}
  return merge(rollouts, picks, group_size, mesh), metrics


def _fewest(count: int) -> int:
  """The smallest per-process count: every process must agree on whether to draw again."""
  if jax.process_count() == 1:
    return count
  return int(np.min(multihost_utils.process_allgather(np.array([count]))))


def _all_processes(values: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return values
  return np.asarray(multihost_utils.process_allgather(values[None], tiled=True)).sum(axis=0)


def merge(rollouts: list[Rollout], picks: list[tuple[int, int]], group_size: int, mesh: Mesh
          ) -> Rollout:
  """The picked (draw, prompt) groups of `rollouts` as one rollout, prompts left-padded to the
  longest bucket among them."""
  if len(rollouts) == 1 and [b for _, b in picks] == list(range(len(rollouts[0].batch.input_ids))):
    return rollouts[0]
  prompt_rows = lambda b: range(b * group_size, (b + 1) * group_size)
  rows = [(d, r) for d, b in picks for r in prompt_rows(b)]
  return Rollout(batch=_merge_batches([r.batch for r in rollouts], picks),
                 out=_merge_outputs([r.out for r in rollouts], rows, mesh),
                 reward=_take([r.reward for r in rollouts], rows))


def _take(items: list[Any], picks: list[tuple[int, int]], skip: tuple[str, ...] = ()) -> Any:
  """Row `i` of item `d` for each (d, i), field by field, for dataclasses of per-row arrays."""
  values = {}
  for field in dataclasses.fields(items[0]):
    if field.name not in skip:
      columns = [np.asarray(getattr(item, field.name)) for item in items]
      values[field.name] = np.stack([columns[d][i] for d, i in picks])
  return dataclasses.replace(items[0], **values)


def _left_pad(arrays: list[np.ndarray]) -> list[np.ndarray]:
  """[N, T_i] arrays → [N, max T_i], zeros on the left: padding is masked, its ids never read."""
  width = max(a.shape[1] for a in arrays)
  return [np.pad(a, [(0, 0), (width - a.shape[1], 0)]) for a in arrays]


def _merge_batches(batches: list[Any], picks: list[tuple[int, int]]) -> Any:
  """Loader batches → the picked prompts (ids left-padded, each prompt's image patches kept)."""
  ids = _left_pad([np.asarray(b.input_ids) for b in batches])
  masks = _left_pad([np.asarray(b.attention_mask) for b in batches])
  padded = [dataclasses.replace(b, input_ids=i, attention_mask=m)
            for b, i, m in zip(batches, ids, masks)]
  merged = _take(padded, picks, skip=("pixel_values",))
  if batches[0].pixel_values is None:
    return merged
  patches = [np.asarray(b.pixel_values).reshape(len(b.input_ids), -1, b.pixel_values.shape[-1])
             for b in batches]
  pixels = np.stack([patches[d][i] for d, i in picks])
  return dataclasses.replace(merged, pixel_values=pixels.reshape(-1, pixels.shape[-1]))


def _merge_outputs(outs: list[SamplerOutput], rows: list[tuple[int, int]], mesh: Mesh
                   ) -> SamplerOutput:
  """Sampler outputs → the picked rows as global arrays (prompts left-padded to one width)."""
  local = lambda field: [sharding.local_rows(getattr(o, field)) for o in outs]
  prompt_tokens, prompt_mask = _left_pad(local("prompt_tokens")), _left_pad(local("prompt_mask"))
  pick = lambda columns: sharding.global_rows(np.stack([columns[d][r] for d, r in rows]), mesh)
  return SamplerOutput(
      tokens=pick(local("tokens")), mask=pick(local("mask")), log_probs=pick(local("log_probs")),
      lengths=pick(local("lengths")), finish_reasons=pick(local("finish_reasons")),
      prompt_tokens=pick(prompt_tokens), prompt_mask=pick(prompt_mask),
      text=tuple(outs[d].text[r] for d, r in rows))
