"""Closed loop: the oracle replays the expert, random options fail, the model's answers are parsed
and executed; results, table and contact sheets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from robot_r1_jax.data.loader import LoaderConfig
from robot_r1_jax.data.mcqa import McqaConfig
from robot_r1_jax.data.prompts import ACTION_TOKENS, XYZ
from robot_r1_jax.generate import sampling
from robot_r1_jax.model import config as config_lib
from robot_r1_jax.model.qwen2_5_vl import init_model
from robot_r1_jax.stages import closed_loop as cl

from testing import EOS, PAD, make_sampler

pytest.importorskip("pybullet")
from robot_r1_jax.data.sim import task_names  # noqa: E402  (needs pybullet)

TRAINING_TASKS = tuple(task_names(held_out=False))


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
  """Oracle and random options on 5 episodes of each training-task analogue, 32 px."""
  out = tmp_path_factory.mktemp("closed_loop")
  config = cl.ClosedLoopConfig(tasks=TRAINING_TASKS, episodes=5, image_size=32, batch_size=13)
  results = [cl.run("oracle", cl.oracle_policy, config, out),
             cl.run("random", cl.random_policy(0, config.mcqa), config, out)]
  cl.write_json(results, out / "closed_loop.json")
  return out, results


def test_oracle_succeeds_on_every_training_task_and_random_options_do_not(baselines):
  _, (oracle, random) = baselines
  assert len(TRAINING_TASKS) == 5
  for task in TRAINING_TASKS:
    assert oracle.success_rate(task) >= 0.9, (task, oracle.summary())
  assert oracle.mean_l1() < 0.003  # the printed options' 3-decimal rounding, no more
  assert random.success_rate() <= 0.3, random.summary()
  assert random.mean_l1() > 0.3  # three options in four are anywhere in the workspace
  # Every keyframe was answered by a parsable option, by both.
  for result in (oracle, random):
    assert all(None not in e.answered and len(e.answered) == e.keyframes > 0
               for e in result.episodes)


def test_results_table_json_and_contact_sheets(baselines):
  out, results = baselines
  data = json.loads((out / "closed_loop.json").read_text())
  assert set(data) == {"oracle", "random"}
  assert data["oracle"]["success_rate"]["all"] == results[0].success_rate()
  assert len(data["random"]["per_episode"]) == 25
  table = cl.table(results)
  assert table.splitlines()[0].split() == ["closed", "loop", "success", "oracle", "random"]
  assert all(task in table for task in TRAINING_TASKS) and "mean L1" in table
  sheets = sorted((out / "oracle").glob("*.png"))
  assert len(sheets) == 25
  episode = data["oracle"]["per_episode"][0]
  with Image.open(out / "oracle" / f"{episode['task']}_{episode['seed']}.png") as image:
    assert image.width == 160 * episode["keyframes"]


def test_seeds_are_not_the_generators():
  from robot_r1_jax.data.sim import episode_seed
  from robot_r1_jax.data.sim.closed_loop import closed_loop_seed

  for task in TRAINING_TASKS:
    train = {episode_seed(0, task, e, a) for e in range(50) for a in range(3)}
    held = {closed_loop_seed(0, task, e, a) for e in range(50) for a in range(3)}
    assert not train & held


def test_unparsable_answers_hold_the_arm_still():
  config = cl.ClosedLoopConfig(tasks=("pick_up_cup",), episodes=1, image_size=32)
  result = cl.run("silent", lambda questions, images: ["no answer"] * len(questions), config)
  (episode,) = result.episodes
  assert episode.answered == (None,) * episode.keyframes and episode.l1 is None
  assert not episode.success


@pytest.mark.parametrize("answer_format,oracle_l1", [
    (XYZ, 0.003),  # 3 decimals per axis
    (ACTION_TOKENS, 0.006),  # half a bin per axis: 1/512 of 1 m, 1 m and 0.848 m
])
def test_open_ended_answers_move_the_arm_to_the_written_position(answer_format, oracle_l1):
  mcqa = McqaConfig(answer_format=answer_format)
  config = cl.ClosedLoopConfig(tasks=("push_button",), episodes=2, image_size=32, mcqa=mcqa)
  oracle = cl.run("oracle", cl.oracle_policy, config)
  assert oracle.success_rate() == 1.0 and oracle.mean_l1() < oracle_l1
  random = cl.run("random", cl.random_policy(0, mcqa), config)
  assert random.success_rate() == 0.0 and random.mean_l1() > 0.3
  if answer_format == ACTION_TOKENS:  # a bin past the last is no position: the arm holds
    past = cl.run("past", lambda qs, _: ["<answer> 3 256 7 </answer>"] * len(qs), config)
    assert all(a is None for e in past.episodes for a in e.answered)


def test_model_policy_decodes_every_keyframe_in_fixed_shapes(tokenizer):
  model = init_model(config_lib.tiny(), seed=0)
  sampler = make_sampler(model, tokenizer, stop_tokens=(EOS, PAD),
                         sampling=sampling.SamplingParams(temperature=0.0),
                         prompt_buckets=(512,), new_token_buckets=(8,))
  config = cl.ClosedLoopConfig(tasks=("push_button", "pick_up_cup"), episodes=1, image_size=32,
                               batch_size=3)
  calls = []

  def policy(questions, images):
    texts = model_policy(questions, images)
    calls.append(len(questions))
    return texts

  model_policy = cl.model_policy(sampler, LoaderConfig(length_buckets=(512,)), max_new_tokens=8,
                                 batch_size=config.batch_size)
  result = cl.run("model", policy, config)
  assert calls == [2, 2, 2]  # both tasks' 3 keyframes, answered together
  assert [e.keyframes for e in result.episodes] == [3, 3]
  assert all(len(e.completions) == 3 and all(isinstance(t, str) for t in e.completions)
             for e in result.episodes)
  assert not np.any([e.success for e in result.episodes])  # an untrained model answers nothing
