"""Evaluation: metrics on hand-labelled completions, greedy determinism, padding, JSON, tables."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from robot_r1_jax.data import extract
from robot_r1_jax.data.loader import Batch, LoaderConfig
from robot_r1_jax.data.mcqa import McqaConfig
from robot_r1_jax.data.prompts import ActionBins, Workspace
from robot_r1_jax.generate import sampling
from robot_r1_jax.model import config as config_lib
from robot_r1_jax.model.qwen2_5_vl import init_model
from robot_r1_jax.stages import evaluate as ev
from robot_r1_jax.train.metrics import MetricsWriter

from data.conftest import write_episode
from testing import EOS, PAD, image_prompts, make_sampler, question_batch

STOP = (EOS, PAD)
GREEDY = sampling.SamplingParams(temperature=0.0)

# (question type, task, reference, completion, tokens, formatted, correct, L1, xyz reward).
HAND_LABELLED = [
    ("waypoint", "cup", "[[A]]", "<think>up</think> <answer>[[A]]</answer>", 10,
     True, True, None, None),
    # Two options in one answer block: not an answer.
    ("waypoint", "button", "[[B]]", "<think>x</think><answer>[[A]] or [[B]]</answer>", 12,
     True, False, None, None),
    # Answer before think: right answer, broken format.
    ("movement", "cup", "[[C]]", "<answer>[[C]]</answer><think>because</think>", 8,
     False, True, None, None),
    # Capitalised think tags are not the tags.
    ("movement", "button", "[[D]]", "<Think>hm</Think> <answer> [[D]] </answer>", 9,
     False, True, None, None),
    # Two answer blocks, both right: neither format nor answer.
    ("current_state", "cup", "[[A]]",
     "<think>a</think><answer>[[A]]</answer><answer>[[A]]</answer>", 20, False, False, None, None),
    ("current_state", "button", "[[B]]", "", 1, False, False, None, None),
    # Open-ended: 5 cm off on x and z.
    ("waypoint", "cup", "[0.1, 0.2, 0.3]", "<think>t</think><answer>[0.15, 0.2, 0.25]</answer>",
     15, True, None, 0.1, 0.9),
    # Two numbers, and an exponent: no position.
    ("current_state", "cup", "[0.5, -0.1, 0.8]", "<think>t</think><answer>[0.5, -0.1]</answer>",
     14, True, None, None, 0.0),
    ("current_state", "button", "[0.0, 0.0, 1.0]",
     "<think></think><answer>[1e-3, 0, 1]</answer>", 16, True, None, None, 0.0),
    # No think block; far off: L1 1.5, reward clipped to 0.
    ("waypoint", "button", "[0.0, 0.0, 1.0]", "<answer>[0.0, 0.5, 0.0]</answer>", 11,
     False, None, 1.5, 0.0),
]


def _score(rows=HAND_LABELLED) -> tuple[ev.RecordScore, ...]:
  types, tasks, answers, texts, lengths = ([row[i] for row in rows] for i in range(5))
  return ev.score(texts, answers=answers, question_types=types, tasks=tasks, lengths=lengths,
                  record_indices=list(range(len(rows))))


def test_score_matches_hand_labels():
  scores = _score()
  assert [s.formatted for s in scores] == [row[5] for row in HAND_LABELLED]
  assert [s.correct for s in scores] == [row[6] for row in HAND_LABELLED]
  assert [s.l1 for s in scores] == pytest.approx([row[7] for row in HAND_LABELLED])
  assert [s.xyz_reward for s in scores] == pytest.approx([row[8] for row in HAND_LABELLED])
  assert [s.record_index for s in scores] == list(range(10))

  result = ev.EvalResult.from_records(scores)
  o = result.overall
  assert (o.count, o.num_choice, o.num_open_ended, o.num_parsed) == (10, 6, 4, 2)
  assert o.accuracy == pytest.approx(3 / 6)
  assert o.format_rate == pytest.approx(5 / 10)
  assert o.mean_length == pytest.approx(116 / 10)
  assert o.mean_l1 == pytest.approx((0.1 + 1.5) / 2)
  assert o.mean_xyz_reward == pytest.approx(0.9 / 4)

  assert list(result.by_type) == ["waypoint", "current_state", "movement"]  # QUESTION_TYPES order
  waypoint, state, movement = result.by_type.values()
  assert (waypoint.count, waypoint.accuracy, waypoint.format_rate) == (4, 0.5, 0.75)
  assert waypoint.mean_l1 == pytest.approx(0.8) and waypoint.mean_xyz_reward == pytest.approx(0.45)
  assert (movement.count, movement.accuracy, movement.format_rate) == (2, 1.0, 0.0)
  assert movement.num_open_ended == 0 and movement.mean_l1 is None
  assert movement.mean_xyz_reward is None
  assert (state.count, state.accuracy, state.format_rate) == (4, 0.0, 0.5)
  assert (state.num_parsed, state.mean_l1, state.mean_xyz_reward) == (0, None, 0.0)

  assert list(result.by_task) == ["button", "cup"]
  assert result.by_task["cup"].accuracy == pytest.approx(2 / 3)
  assert result.by_task["cup"].format_rate == pytest.approx(3 / 5)
  assert result.by_task["button"].accuracy == pytest.approx(1 / 3)
  assert result.by_task["button"].format_rate == pytest.approx(2 / 5)


def test_action_token_answers_score_bin_accuracy_and_metres():
  # 100 bins per axis over a 1 m cube: a bin is 1 cm, its centre at k + 0.5 cm.
  bins = ActionBins(Workspace(low=(0.0, 0.0, 0.0), high=(1.0, 1.0, 1.0)), count=100)
  rows = [("waypoint", "cup", "10 20 30", "<think> </think> <answer> 10 20 30 </answer>"),
          ("waypoint", "cup", "10 20 30", "<think> </think> <answer> 12 20 29 </answer>"),
          ("current_state", "cup", "50 50 50", "<answer> 50 50 </answer>"),
          ("current_state", "cup", "[[B]]", "<answer> [[B]] </answer>")]
  scores = ev.score([r[3] for r in rows], answers=[r[2] for r in rows],
                    question_types=[r[0] for r in rows], tasks=[r[1] for r in rows],
                    lengths=[5] * 4, bins=bins)
  assert [s.correct for s in scores] == [True, False, False, True]
  assert [s.open_ended for s in scores] == [True, True, True, False]
  assert scores[0].l1 == 0.0 and scores[2].l1 is None and scores[3].l1 is None
  assert scores[1].l1 == pytest.approx(0.03)  # 2 bins on x, 1 on z
  assert [s.xyz_reward for s in scores][:3] == pytest.approx([1.0, np.exp(-3 / 16), 0.0])
  result = ev.EvalResult.from_records(scores)
  assert result.overall.bin_accuracy == pytest.approx(1 / 3)
  assert result.overall.accuracy == 1.0  # the one multiple-choice record
  assert result.overall.mean_l1 == pytest.approx(0.015)
  assert result.scalars()["eval/bin_accuracy/all"] == pytest.approx(1 / 3)
  assert "bin accuracy" in result.table().splitlines()[0]
  assert "bins SFT" in ev.compare_table(result, result).splitlines()[0]
  # Without the data's bins there are no metres, but the rest holds.
  assert ev.score([rows[1][3]], answers=["10 20 30"], question_types=["waypoint"], tasks=["cup"],
                  lengths=[5])[0].l1 is None


def test_collapse_check_names_the_constant_answer():
  refs = ["[[A]]", "[[B]]", "[[C]]", "[[A]]", "[[D]]", "[[C]]", "[[C]]"]
  texts = ["<think> </think> <answer> [[C]] </answer>"] * 6 + ["<answer>[[B]]</answer>"]
  m = ev.EvalResult.from_records(ev.score(
      texts, answers=refs, question_types=["waypoint"] * 7, tasks=["cup"] * 7,
      lengths=[15] * 7)).by_type["waypoint"]
  assert m.accuracy == pytest.approx(2 / 7)
  assert m.top_answer_share == pytest.approx(6 / 7)  # [[C]] six times
  assert m.constant_accuracy == pytest.approx(3 / 7)  # "always [[C]]" would score more
  assert ev.EvalResult.from_records(_score()).scalars()["eval/top_answer_share/movement"] == 0.5


def test_score_rejects_bad_inputs():
  with pytest.raises(ValueError, match="answers"):
    ev.score(["a", "b"], answers=["[[A]]"], question_types=["movement"] * 2, tasks=["t"] * 2,
             lengths=[1, 1])
  with pytest.raises(ValueError, match="neither an option"):
    ev.score(["a"], answers=["left"], question_types=["movement"], tasks=["t"], lengths=[1])
  with pytest.raises(ValueError, match="no records"):
    ev.EvalResult.from_records([])


def test_json_round_trip_scalars_and_tables(tmp_path):
  result = ev.EvalResult.from_records(_score())
  path = result.write(tmp_path / "eval" / "result.json")
  assert ev.EvalResult.read(path) == result
  data = json.loads(path.read_text())
  assert data["overall"]["accuracy"] == 0.5 and data["by_type"]["movement"]["mean_l1"] is None
  assert data["records"][3]["completion"] == HAND_LABELLED[3][3]
  with pytest.raises(ValueError, match="bad.json"):
    (tmp_path / "bad.json").write_text('{"records": [{"task": "t"}]}')
    ev.EvalResult.read(tmp_path / "bad.json")

  scalars = result.scalars()
  assert scalars["eval/accuracy/all"] == 0.5
  assert scalars["eval/accuracy/movement"] == 1.0
  assert scalars["eval/count/task/cup"] == 5.0
  assert scalars["eval/l1/waypoint"] == pytest.approx(0.8)
  assert "eval/l1/movement" not in scalars  # no open-ended movement question
  assert set(result.scalars(prefix="val/")) == {"val/" + k[len("eval/"):] for k in scalars}
  with MetricsWriter(tmp_path / "run", enabled=True) as writer:
    writer.scalars(7, scalars)
  line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
  assert line["step"] == 7 and line["eval/format_rate/all"] == 0.5

  table = result.table().splitlines()
  assert table[0].split() == ["question", "type", "count", "accuracy", "constant", "same",
                              "answer", "format", "length", "L1"]
  # waypoint's choices: [[A]] and no answer ("[[A]] or [[B]]"); references A and B.
  assert table[2].split() == ["waypoint", "4", "50.0%", "50.0%", "50.0%", "75.0%", "12.0", "0.800"]
  # current_state's two choice completions answer nothing: no answer is never "the same answer".
  assert table[3].split() == ["current_state", "4", "0.0%", "50.0%", "0.0%", "50.0%", "12.8", "—"]
  assert table[4].split() == ["movement", "2", "100.0%", "50.0%", "50.0%", "0.0%", "8.5", "—"]
  assert table[5].split() == ["all", "10", "50.0%", "33.3%", "16.7%", "50.0%", "11.6", "0.800"]

  # "After": the waypoint question with two options in its answer now names only the right one.
  rows = list(HAND_LABELLED)
  rows[1] = rows[1][:3] + ("<think>x</think><answer>[[B]]</answer>",) + rows[1][4:]
  after = ev.EvalResult.from_records(_score(rows))
  compare = ev.compare_table(result, after).splitlines()
  assert compare[0].split() == ["question", "type", "count", "accuracy", "SFT", "accuracy",
                                "SFT→GRPO", "Δ", "constant", "same", "answer", "SFT", "same",
                                "answer", "SFT→GRPO", "L1", "SFT", "L1", "SFT→GRPO"]
  assert compare[2].split() == ["waypoint", "4", "50.0%", "100.0%", "+50.0", "50.0%", "50.0%",
                                "50.0%", "0.800", "0.800"]
  assert compare[5].split() == ["all", "10", "50.0%", "66.7%", "+16.7", "33.3%", "16.7%", "16.7%",
                                "0.800", "0.800"]
  with pytest.raises(ValueError, match="different records"):
    ev.compare_table(result, ev.EvalResult.from_records(_score()[:4]))


# ---------------------------------------------------------------------------------------------
# With a model: a tiny random Qwen2.5-VL and a greedy sampler.


@pytest.fixture(scope="module")
def model():
  return init_model(config_lib.tiny(), seed=0)


@pytest.fixture(scope="module")
def sampler(model, tokenizer):
  # 320 holds the extractor's movement prompts (≈310 tokens with a 56 px image).
  return make_sampler(model, tokenizer, stop_tokens=STOP, sampling=GREEDY,
                      prompt_buckets=(64, 320), new_token_buckets=(16,))


@pytest.fixture(scope="module")
def batch(tokenizer) -> Batch:
  """Two questions and a padding row whose reference would make the scorer raise."""
  rng = np.random.default_rng(0)
  prompts = image_prompts(tokenizer, [
      (text, rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))
      for text in ("Which way? [[A]] up [[B]] down", "Where next? [[A]] left [[B]] right",
                   "Padding.")], length=64, pad_id=tokenizer.pad_token_id)
  return question_batch(prompts, answers=["[[A]]", "[0.1, 0.2, 0.3]", "?"],
                        question_types=["movement", "waypoint", "movement"],
                        tasks=["cup", "cup", "padding"], record_indices=[4, 7, 0],
                        epochs=[0, 0, 1], valid=[True, True, False])


def test_evaluate_is_deterministic_and_leaves_out_padding(sampler, batch):
  config = ev.EvalConfig(max_new_tokens=16, progress=False)
  first = ev.evaluate(sampler, [batch], config)
  traces = dict(sampler.traces.counts)
  second = ev.evaluate(sampler, iter([batch]), config)
  assert first == second
  assert sampler.traces.counts == traces, "a second evaluation recompiled"

  assert first.overall.count == 2 and list(first.by_task) == ["cup"]
  assert [r.record_index for r in first.records] == [4, 7]
  assert (first.overall.num_choice, first.overall.num_open_ended) == (1, 1)
  # The records hold the sampler's greedy output for the valid rows (any key gives it).
  direct = sampler(batch.input_ids, batch.attention_mask, jax.random.key(123), max_new_tokens=16,
                   pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw)
  assert [r.completion for r in first.records] == list(direct.text[:2])
  assert [r.length for r in first.records] == np.asarray(direct.lengths)[:2].tolist()
  assert all(1 <= r.length <= 16 for r in first.records)


@pytest.mark.parametrize("change, message", [
    (dict(sampling=sampling.SamplingParams(temperature=1.0)), "not greedy"),
    (dict(num_samples=2), "num_samples=2"),
    (dict(tokenizer=None), "no tokenizer"),
])
def test_evaluate_refuses_a_nondeterministic_sampler(model, tokenizer, batch, change, message):
  tok = change.pop("tokenizer", tokenizer)
  sampler = make_sampler(model, tok, stop_tokens=STOP, **dict(dict(sampling=GREEDY), **change))
  with pytest.raises(ValueError, match=message):
    ev.evaluate(sampler, [batch])


def test_evaluate_split_scores_every_record_once_in_order(tmp_path, sampler):
  for k in range(2):
    write_episode(tmp_path / "demos", "push_button", k, seed=k)
  # Movement questions only: their prompts share one length bucket, so one prefill compiles.
  manifest = extract.extract(tmp_path / "demos", tmp_path / "data", extract.ExtractConfig(
      image_size=56, val_fraction=0.5, progress=False,
      mcqa=McqaConfig(question_types=("movement",))))
  n = manifest.splits["val"].num_records
  assert n == 8  # so batches of 3 end with a padded one
  result = ev.evaluate_split(sampler, tmp_path / "data", "val",
                             ev.EvalConfig(max_new_tokens=16, batch_size=3, progress=False),
                             loader_config=LoaderConfig(length_buckets=(64, 320), shuffle=True))
  assert [r.record_index for r in result.records] == list(range(n))
  assert result.overall.count == n and list(result.by_type) == ["movement"]
  assert result.overall.accuracy is not None and all(r.answer.startswith("[[")
                                                     for r in result.records)
