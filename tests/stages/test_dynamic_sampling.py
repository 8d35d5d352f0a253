"""Merging draws of a dynamic-sampling step: picked groups, left-padded prompts, images kept."""

from __future__ import annotations

import json

import jax
import numpy as np

from robot_r1_jax.generate.sampler import SamplerOutput
from robot_r1_jax.rl import rewards
from robot_r1_jax.stages import dynamic_sampling

from testing import ImagePrompts, question_batch

G, P = 2, 3  # samples per prompt, image patches per prompt


def _rollout(draw: int, width: int, mesh) -> dynamic_sampling.Rollout:
  """Two prompts of `width` tokens (left-padded by one); every value names its draw and row."""
  ids = np.full((2, width), 0) + np.arange(width) + 100 * draw
  mask = np.ones((2, width), int)
  mask[:, 0] = 0
  prompts = ImagePrompts(ids=ids, mask=mask, pixels=tuple(
      np.full((P, 4), 10 * draw + b, np.float32) for b in range(2)), grids=((1, 1, P),) * 2)
  batch = question_batch(prompts, answers=[f"d{draw}b0", f"d{draw}b1"],
                         question_types=["movement"] * 2, tasks=["t"] * 2)
  rows = 2 * G
  put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  out = SamplerOutput(
      tokens=put(np.arange(rows * 4).reshape(rows, 4) + 1000 * draw),
      mask=put(np.ones((rows, 4), bool)), log_probs=put(np.full((rows, 4), -float(draw))),
      lengths=put(np.full(rows, 4, np.int32)), finish_reasons=put(np.zeros(rows, np.int32)),
      prompt_tokens=put(np.repeat(ids, G, 0)), prompt_mask=put(np.repeat(mask, G, 0).astype(bool)),
      text=tuple(f"d{draw}r{r}" for r in range(rows)))
  total = np.arange(rows, dtype=np.float32) + 10 * draw
  zeros = np.zeros(rows, np.float32)
  reward = rewards.RewardOutput(format=zeros, answer=total, xyz=zeros,
                                open_ended=np.zeros(rows, bool), total=total)
  return dynamic_sampling.Rollout(batch=batch, out=out, reward=reward)


def test_merge_takes_the_picked_groups_and_left_pads_prompts(one_device_mesh):
  first, second = _rollout(0, 3, one_device_mesh), _rollout(1, 5, one_device_mesh)
  merged = dynamic_sampling.merge([first, second], [(0, 1), (1, 0)], G, one_device_mesh)
  # Prompts: draw 0's second (3 tokens, two zeros on the left) and draw 1's first (5 tokens).
  np.testing.assert_array_equal(merged.batch.input_ids, [[0, 0, 0, 1, 2], [100, 101, 102, 103, 104]])
  np.testing.assert_array_equal(merged.batch.attention_mask, [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(merged.batch.answers, ["d0b1", "d1b0"])
  np.testing.assert_array_equal(merged.batch.pixel_values[:, 0], [1, 1, 1, 10, 10, 10])
  np.testing.assert_array_equal(merged.out.prompt_tokens[:, :2], [[0, 0]] * G + [[100, 101]] * G)
  np.testing.assert_array_equal(np.asarray(merged.out.prompt_mask).sum(1), [2, 2, 4, 4])
  assert merged.out.text == ("d0r2", "d0r3", "d1r0", "d1r1")
  np.testing.assert_array_equal(merged.out.tokens[:, 0], [8, 12, 1000, 1004])
  np.testing.assert_array_equal(merged.out.log_probs[:, 0], [0, 0, -1, -1])
  np.testing.assert_array_equal(merged.reward.total, [2, 3, 10, 11])
  # Every group of one draw, in order, is that draw unchanged.
  assert dynamic_sampling.merge([first], [(0, 0), (0, 1)], G, one_device_mesh) is first


def test_fill_counts_draws_and_fills_with_refused_groups(one_device_mesh):
  rollouts = {d: _rollout(d, 3, one_device_mesh) for d in range(3)}
  keep_second_prompt = lambda r: np.array([False, True])
  merged, metrics = dynamic_sampling.fill(rollouts[0], keep_second_prompt, rollouts.get, 3, G,
                                          one_device_mesh)
  assert metrics == {"dynamic_sampling/draws": 2.0, "dynamic_sampling/kept_fraction": 0.5,
                     "dynamic_sampling/refused_in_batch": 0.0}
  np.testing.assert_array_equal(merged.batch.answers, ["d0b1", "d1b1"])
  keep_none = lambda r: np.array([False, False])
  merged, metrics = dynamic_sampling.fill(rollouts[0], keep_none, rollouts.get, 2, G,
                                          one_device_mesh)
  assert metrics["dynamic_sampling/draws"] == 2.0
  assert metrics["dynamic_sampling/refused_in_batch"] == 2.0
  np.testing.assert_array_equal(merged.batch.answers, ["d0b0", "d0b1"])  # the first refused


def test_metrics_are_python_floats_whatever_the_process_count(one_device_mesh, monkeypatch):
  """Metrics go into the checkpoint's JSON meta: a numpy float32 from the cross-process sum once
  failed the save on one process while the other waited in a collective."""
  rollouts = {d: _rollout(d, 3, one_device_mesh) for d in range(2)}
  monkeypatch.setattr(dynamic_sampling, "_all_processes",
                      lambda values: (2 * values).astype(np.float32))  # what allgather gives
  _, metrics = dynamic_sampling.fill(rollouts[0], lambda r: np.array([False, True]),
                                     rollouts.get, 2, G, one_device_mesh)
  assert all(type(v) is float for v in metrics.values()), metrics
  json.dumps(metrics)
