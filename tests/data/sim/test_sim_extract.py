"""The extractor runs on a simulated demo tree and yields all three question types per task."""

from __future__ import annotations

import collections

import pytest

pytest.importorskip("pybullet")
pytest.importorskip("array_record")

# pylint: disable=wrong-import-position
from robot_r1_jax.data import extract
from robot_r1_jax.data.prompts import QUESTION_TYPES
from robot_r1_jax.data.records import read_records
from robot_r1_jax.data.sim import task_names


def test_extractor_yields_every_question_type_for_every_task(demo_tree, tmp_path):
  config = extract.ExtractConfig(image_size=0, val_fraction=0.0, progress=False)
  manifest = extract.extract(demo_tree, tmp_path / "shards", config)
  assert manifest.skipped == ()
  kinds = collections.defaultdict(set)
  for path in manifest.shard_paths(tmp_path / "shards", "train"):
    for record in read_records(path):
      question = record.question
      kinds[question.task].add(question.question_type)
      assert record.image().shape == (32, 32, 3)
      assert question.frame < question.next_keyframe
  assert {task: sorted(types) for task, types in kinds.items()} == {
      task: sorted(QUESTION_TYPES) for task in task_names()}
