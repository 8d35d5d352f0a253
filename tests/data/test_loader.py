"""Loader: bucketed shapes, rows equal to their records, disjoint process shards, exact resume."""

from __future__ import annotations

import collections
import json
import pathlib
import subprocess
import sys
import textwrap

import grain
from array_record.python.array_record_module import ArrayRecordWriter
import numpy as np
import orbax.checkpoint as ocp
import pytest

from robot_r1_jax.data import extract, loader, records, rlbench_io
from robot_r1_jax.model import processor

# Prompt lengths with the tiny tokenizer at 56 px (4 image tokens): movement ≈ 310, current state
# 422, waypoint 459; so batches land in all three buckets.
_BUCKETS = (320, 448, 512)
_IMAGE_PAD_ID = 1012  # <|image_pad|> in the tiny tokenizer.


@pytest.fixture
def data_dir(tmp_path, make_episode) -> pathlib.Path:
  """An extractor output of 8 synthetic episodes: 156 train and 52 val records, 56×56 images."""
  root = tmp_path / "demos"
  for k in range(4):
    make_episode(root, "task_a", k, seed=k)
    make_episode(root, "task_b", k, seed=10 + k)
  extract.extract(root, tmp_path / "out",
                  extract.ExtractConfig(image_size=56, val_fraction=0.25, progress=False))
  return tmp_path / "out"


def _config(**overrides) -> loader.LoaderConfig:
  return loader.LoaderConfig(**dict(dict(batch_size=4, length_buckets=_BUCKETS), **overrides))


def _records(data_dir: pathlib.Path, split: str) -> list[records.Record]:
  manifest = records.Manifest.load(data_dir)
  return [r for p in manifest.shard_paths(data_dir, split) for r in records.read_records(p)]


def _single(shard_count: int = 1, shard_index: int = 0) -> grain.sharding.ShardOptions:
  return grain.sharding.ShardOptions(shard_index=shard_index, shard_count=shard_count)


def _assert_batches_equal(a: loader.Batch, b: loader.Batch) -> None:
  for field in loader.Batch.__dataclass_fields__:
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def test_batches_stay_in_the_declared_buckets(data_dir, tokenizer):
  data = loader.make_loader(data_dir, "train", _config(num_epochs=3), shard=_single())
  assert (data.num_records, data.steps_per_epoch, data.num_steps) == (156, 39, 117)
  pad_id = tokenizer.pad_token_id
  lengths = collections.Counter()
  batches = list(data)
  assert len(batches) == data.num_steps
  for batch in batches:
    b, t = batch.input_ids.shape
    assert b == 4 and t in _BUCKETS
    assert batch.input_ids.dtype == batch.attention_mask.dtype == np.int32
    assert batch.attention_mask.shape == (b, t)
    prompt_lengths = batch.attention_mask.sum(1)
    # The smallest bucket that holds the longest prompt, left-padded with the pad id.
    assert t == min(x for x in _BUCKETS if x >= prompt_lengths.max())
    expected_mask = np.arange(t)[None, :] >= (t - prompt_lengths)[:, None]
    np.testing.assert_array_equal(batch.attention_mask, expected_mask)
    assert (batch.input_ids[expected_mask == 0] == pad_id).all()
    assert batch.image_grid_thw.dtype == np.int32 and batch.image_grid_thw.shape == (b, 3)
    assert batch.pixel_values.dtype == np.float32
    assert batch.pixel_values.shape == (batch.image_grid_thw.prod(1).sum(), 1176)
    assert batch.valid.all()
    lengths[t] += 1
  assert set(lengths) == set(_BUCKETS), lengths


@pytest.mark.parametrize("min_pixels, tokens", [(processor.MIN_PIXELS, 4), (112 * 112, 16)])
def test_rows_equal_their_records(data_dir, tokenizer, min_pixels, tokens):
  """Each row is its record: prompt ids with one <|image_pad|> per merged patch, patches, labels."""
  data = loader.make_loader(data_dir, "val", _config(min_pixels=min_pixels), shard=_single())
  by_index = _records(data_dir, "val")
  it = iter(data)
  for _ in range(3):
    batch = next(it)
    p = batch.pixel_values.shape[0] // 4
    for row, index in enumerate(batch.record_indices):
      record = by_index[index]
      pixels, grid = processor.preprocess_image(record.image(), min_pixels=min_pixels)
      assert tuple(batch.image_grid_thw[row]) == grid and p == np.prod(grid)
      assert (batch.input_ids[row] == _IMAGE_PAD_ID).sum() == tokens == p // 4
      np.testing.assert_array_equal(batch.pixel_values[row * p:(row + 1) * p], pixels)
      ids = processor.build_prompt_ids(tokenizer, record.question.prompt, grid)
      np.testing.assert_array_equal(batch.input_ids[row][batch.attention_mask[row] == 1], ids)
      q = record.question
      assert (batch.answers[row], batch.question_types[row], batch.tasks[row],
              batch.episodes[row], batch.frames[row]) == (
                  q.answer, q.question_type, q.task, q.episode, q.frame)
  assert set(batch.answers) <= {"[[A]]", "[[B]]", "[[C]]", "[[D]]"}


@pytest.mark.parametrize("shard_count", [2, 3])
@pytest.mark.parametrize("drop_remainder", [False, True])
def test_process_shards_are_disjoint_and_cover_each_epoch(data_dir, shard_count, drop_remainder):
  num_records = 52
  config = _config(num_epochs=2, drop_remainder=drop_remainder)
  seen = collections.Counter()  # (epoch, record) -> times read by any process
  steps = set()
  for index in range(shard_count):
    data = loader.make_loader(data_dir, "val", config, shard=_single(shard_count, index))
    batches = list(data)
    steps.add(len(batches))
    assert len(batches) == data.num_steps
    for batch in batches:
      for epoch, record in zip(batch.epochs[batch.valid], batch.record_indices[batch.valid]):
        seen[int(epoch), int(record)] += 1
  assert len(steps) == 1  # Every process runs the same number of steps.
  assert max(seen.values()) == 1  # Disjoint: no record is read twice in an epoch.
  if drop_remainder:
    # Only the < shard_count × batch_size positions at the end of the last epoch go unread.
    assert {(0, r) for r in range(num_records)} <= set(seen)
    assert 2 * num_records - len(seen) < shard_count * 4
  else:
    assert set(seen) == {(e, r) for e in range(2) for r in range(num_records)}


def test_state_resumes_the_exact_next_batch(data_dir, tmp_path):
  data = loader.make_loader(data_dir, "train", _config(read_threads=2), shard=_single())
  it = iter(data)
  for _ in range(50):  # Past the first epoch (39 batches).
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  resumed = iter(data)
  resumed.set_state(state)
  for want in expected:
    _assert_batches_equal(next(resumed), want)

  # Through orbax with grain's checkpoint handler, as the trainer saves it.
  with ocp.CheckpointManager(tmp_path / "ckpt",
                             item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as m:
    m.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    m.wait_until_finished()
    want = next(it)
    fresh = iter(data)
    m.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_batches_equal(next(fresh), want)


def test_order_is_seeded_and_reshuffled_each_epoch(data_dir):
  def order(**overrides) -> list[int]:
    data = loader.make_loader(data_dir, "val", _config(num_epochs=2, **overrides),
                              shard=_single())
    return [int(i) for batch in data for i in batch.record_indices]

  first = order(seed=3)
  assert first == order(seed=3)
  assert first != order(seed=4)
  assert sorted(first[:52]) == sorted(first[52:]) == list(range(52))
  assert first[:52] != first[52:]  # A fresh permutation for the second epoch.
  assert order(shuffle=False) == list(range(52)) * 2


def test_a_prompt_longer_than_every_bucket_is_an_error(data_dir):
  data = loader.make_loader(data_dir, "val", _config(length_buckets=(64, 300), shuffle=False),
                            shard=_single())
  with pytest.raises(ValueError, match=r"record 0 \(#0 of .*val-00000.array_record\), .*episode"
                                       r".* tokens, more than the largest length bucket 300"):
    next(iter(data))


def test_mixed_image_sizes_in_a_batch_are_an_error(data_dir):
  manifest = records.Manifest.load(data_dir)
  [path] = manifest.shard_paths(data_dir, "val")
  rows = list(records.read_records(path))
  # Record 1 gets a 28×84 image: its grid differs from the 56×56 images of the others.
  rows[1] = records.Record(rows[1].question, rows[1].variation,
                           rlbench_io.encode_png(np.zeros((28, 84, 3), np.uint8)))
  writer = ArrayRecordWriter(str(path), records.WRITER_OPTIONS)
  for row in rows:
    writer.write(records.encode_record(row))
  writer.close()
  data = loader.make_loader(data_dir, "val", _config(shuffle=False), shard=_single())
  with pytest.raises(ValueError, match=r"images of one batch differ in size: grid \[1, 4, 4\] "
                                       r"and record 1 .* grid \[1, 4, 8\]"):
    next(iter(data))


def test_bad_inputs_are_clear_errors(data_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="manifest.json"):
    loader.make_loader(tmp_path, "train", _config())
  (tmp_path / "manifest.json").write_text("{}")
  with pytest.raises(ValueError, match="manifest.json: not a usable manifest"):
    loader.make_loader(tmp_path, "train", _config())
  with pytest.raises(ValueError, match=r"has no split 'test'; it has \['train', 'val'\]"):
    loader.make_loader(data_dir, "test", _config())
  with pytest.raises(ValueError, match="has 52 records, fewer than one batch_size=32 for each "
                                       "of 2 process"):
    loader.make_loader(data_dir, "val", _config(batch_size=32), shard=_single(2))
  with pytest.raises(FileNotFoundError, match="tokenizer path '/nonexistent'"):
    loader.make_loader(data_dir, "val", _config(tokenizer_path="/nonexistent"))
  (data_dir / "val-00000.array_record").unlink()
  with pytest.raises(FileNotFoundError, match="val-00000.array_record listed in .* does not exist"):
    loader.make_loader(data_dir, "val", _config())
  manifest = json.loads((data_dir / "manifest.json").read_text())
  manifest["splits"]["val"].update(num_records=0, shards=[])
  (data_dir / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match="split 'val' of .* has no records"):
    loader.make_loader(data_dir, "val", _config())
  for field, value in [("batch_size", 0), ("seed", -1), ("num_epochs", 0),
                       ("length_buckets", (512, 256)), ("length_buckets", ()),
                       ("min_pixels", 0), ("worker_count", -1), ("worker_buffer_size", 0)]:
    with pytest.raises(ValueError, match=rf"^{field}="):
      _config(**{field: value})


_WORKER_SCRIPT = """
    import json
    import sys

    from absl import flags
    import grain

    from robot_r1_jax.data import loader


    def main(data_dir, out):
      flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags.
      config = loader.LoaderConfig(batch_size=4, length_buckets=(320, 448, 512), num_epochs=1,
                                   worker_count=2)
      shard = grain.sharding.ShardOptions(shard_index=0, shard_count=1)
      it = iter(loader.make_loader(data_dir, "val", config, shard=shard))
      before = [next(it).record_indices.tolist() for _ in range(6)]
      state = it.get_state()
      for _ in range(3):
        next(it)
      # Rewind before the end: the running workers take the state (after the end grain would
      # start new ones, which is slow on 2 cores).
      it.set_state(state)
      after = [batch.record_indices.tolist() for batch in it]
      it.close()
      with open(out, "w") as f:
        json.dump(before + after, f)


    if __name__ == "__main__":  # grain spawns its workers: without this guard they hang.
      main(*sys.argv[1:])
    """


@pytest.mark.slow  # Two spawned workers each import jax, flax and transformers (≈ 10 s a start).
def test_worker_processes_give_the_same_batches(data_dir, tmp_path):
  script, out = tmp_path / "workers.py", tmp_path / "out.json"
  script.write_text(textwrap.dedent(_WORKER_SCRIPT))
  result = subprocess.run([sys.executable, "-W", "error", str(script), str(data_dir), str(out)],
                          capture_output=True, text=True, timeout=240, check=False)
  assert result.returncode == 0, result.stderr
  data = loader.make_loader(data_dir, "val", _config(num_epochs=1), shard=_single())
  expected = [batch.record_indices.tolist() for batch in data]
  # The same batches in the same order as without workers, and the rewind resumed at batch 6.
  assert json.loads(out.read_text()) == expected
