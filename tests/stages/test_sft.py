"""SFT on the tiny model: targets in buckets, a loss on the target tokens only, exact micro-batch
accumulation, overfitting without recompiling, the non-finite guard, and resume."""

from __future__ import annotations

import dataclasses
import json
import pathlib

from array_record.python.array_record_module import ArrayRecordWriter
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from robot_r1_jax.data import extract, loader, mcqa, records, sft_targets
from robot_r1_jax.data.rlbench_io import encode_png
from robot_r1_jax.model import config as config_lib
from robot_r1_jax.model.qwen2_5_vl import init_model
from robot_r1_jax.stages import sft
from robot_r1_jax.stages.sft_step import SftBatch, SftTrainer
from robot_r1_jax.train.loop import LoopSettings
from robot_r1_jax.train.optim import OptimizerConfig, build_optimizer

from testing import make_mesh

ROWS = 4
# Prompts with the tiny tokenizer and 56-px images are 310–460 tokens: one bucket for them all.
PROMPT_BUCKETS = (512,)
LEARNING_RATE = 3e-3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
  """An extractor output (manifest + one train shard) of 3 episodes × 4 frames × 3 types."""
  out = tmp_path_factory.mktemp("sft_data")
  rng = np.random.default_rng(0)
  config = extract.ExtractConfig(image_size=56, progress=False)
  writer = ArrayRecordWriter(str(out / "train-00000.array_record"), records.WRITER_OPTIONS)
  count, episodes = 0, []
  for k in range(3):
    episodes.append(f"task_a/variation0/episode{k}")
    for frame in range(0, 40, 10):
      state = rng.uniform((0.0, -0.3, 0.8), (0.5, 0.3, 1.3))
      ctx = mcqa.FrameContext(task="task_a", episode=episodes[-1], frame=frame,
                              next_keyframe=frame + 10, description="pick up the cup",
                              state_xyz=tuple(state), next_xyz=tuple(state + rng.normal(0, 0.1, 3)))
      image = encode_png(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))
      for question_type in mcqa.QUESTION_TYPES:
        question = mcqa.build_question(question_type, ctx, seed=0, config=config.mcqa)
        writer.write(records.encode_record(records.Record(question, 0, image)))
        count += 1
  writer.close()
  split = records.SplitInfo(num_records=count, shards=(records.ShardInfo(
      "train-00000.array_record", count, ""),), episodes=tuple(episodes), by_task={}, by_type={})
  manifest = records.Manifest(
      schema_version=records.SCHEMA_VERSION, record_format="", demos_dir="",
      config=json.loads(json.dumps(dataclasses.asdict(config))), episodes_found=3,
      splits={"train": split}, skipped=())
  (out / records.MANIFEST).write_text(manifest.to_json())
  return out


@pytest.fixture(scope="module")
def mesh(one_device_mesh):
  return one_device_mesh


def _loader(data_dir, **overrides) -> loader.Loader:
  return loader.make_loader(data_dir, "train", loader.LoaderConfig(**dict(dict(
      batch_size=ROWS, length_buckets=PROMPT_BUCKETS, shard_by_process=False), **overrides)))


def _optimizer():
  return build_optimizer(OptimizerConfig(learning_rate=LEARNING_RATE, weight_decay=0.0),
                         total_steps=100)


def _trainer(mesh, micro_batch_size: int = ROWS) -> SftTrainer:
  optimizer, schedule = _optimizer()
  return SftTrainer(init_model(config_lib.tiny(), seed=0, mesh=mesh), optimizer, mesh,
                    micro_batch_size=micro_batch_size, lr_schedule=schedule)


@pytest.fixture(scope="module")
def direct_batch(data_dir, tokenizer) -> SftBatch:
  """The first loader batch with direct targets; row lengths cut to 15, 4, 9, 12 target tokens so
  that micro-batches hold unequal token counts."""
  batch = next(iter(_loader(data_dir)))
  questions = sft.SplitQuestions(data_dir, "train")
  built = sft.SftBatchBuilder(tokenizer, questions.target_config("direct"), (16, 32))(
      batch, questions(batch.record_indices))
  mask = built.seqs.completion_mask * (np.arange(16)[None, :] < [[15], [4], [9], [12]])
  return dataclasses.replace(built, seqs=dataclasses.replace(built.seqs, completion_mask=mask))


def _params(trainer: SftTrainer) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(trainer.params)]


# ---------------------------------------------------------------------------------------------
# Data path.


def test_split_questions_are_the_loader_rows(data_dir):
  questions = sft.SplitQuestions(data_dir, "train")
  assert len(questions) == 36
  batch = next(iter(_loader(data_dir)))
  rows = questions(batch.record_indices)
  assert [q.answer for q in rows] == batch.answers.tolist()
  assert [(q.episode, q.frame, q.question_type) for q in rows] == list(zip(
      batch.episodes.tolist(), batch.frames.tolist(), batch.question_types.tolist()))
  # Target settings come from the manifest, i.e. from how the questions were extracted.
  assert questions.target_config("cot") == sft_targets.TargetConfig(kind="cot")
  with pytest.raises(IndexError, match="outside the 36 records"):
    questions([36])
  with pytest.raises(ValueError, match="no split 'val'"):
    sft.SplitQuestions(data_dir, "val")


def test_targets_are_right_padded_into_the_smallest_bucket(data_dir, tokenizer):
  batch = next(iter(_loader(data_dir)))
  questions = sft.SplitQuestions(data_dir, "train")
  rows = questions(batch.record_indices)
  end = tokenizer.convert_tokens_to_ids("<|im_end|>")
  for kind, bucket in (("direct", 16), ("cot", 256)):
    config = questions.target_config(kind)
    built = sft.SftBatchBuilder(tokenizer, config, sft.SftConfig(1).target_buckets)(batch, rows)
    seqs = built.seqs
    assert seqs.completion.shape == seqs.completion_mask.shape == (ROWS, bucket)
    np.testing.assert_array_equal(seqs.prompt_ids, batch.input_ids)  # the loader's left padding
    np.testing.assert_array_equal(seqs.prompt_mask, batch.attention_mask)
    assert seqs.pixel_values.shape == (ROWS, 16, 1176) and built.image_grid == (1, 4, 4)
    lengths = seqs.completion_mask.sum(1)
    for row, question in enumerate(rows):
      # A prefix mask over the target ids, ending with <|im_end|>, then pad ids.
      np.testing.assert_array_equal(seqs.completion_mask[row], np.arange(bucket) < lengths[row])
      ids = seqs.completion[row, :lengths[row]]
      assert ids[-1] == end
      assert (seqs.completion[row, lengths[row]:] == tokenizer.pad_token_id).all()
      assert tokenizer.decode(ids) == sft_targets.target_text(question, config) + "<|im_end|>"
    assert bucket == min(b for b in sft.SftConfig(1).target_buckets if b >= lengths.max())

  padded = dataclasses.replace(batch, valid=np.array([True, False, True, True]))
  mask = sft.SftBatchBuilder(tokenizer, sft_targets.TargetConfig(), (16,))(padded, rows).seqs
  assert mask.completion_mask[1].sum() == 0 and mask.completion_mask[0].sum() > 0
  with pytest.raises(ValueError, match="largest target bucket 128; add a larger one"):
    sft.SftBatchBuilder(tokenizer, questions.target_config("cot"), (64, 128))(batch, rows)
  with pytest.raises(ValueError, match="read the questions from the loader's own split"):
    sft.SftBatchBuilder(tokenizer, sft_targets.TargetConfig(), (16,))(batch, rows[::-1])


# ---------------------------------------------------------------------------------------------
# The loss and the update.


def test_loss_is_the_cross_entropy_of_the_target_tokens_only(mesh, direct_batch):
  seqs = direct_batch.seqs
  model = init_model(config_lib.tiny(), seed=0, mesh=mesh)
  graphdef, state = nnx.split(model)
  grids = (direct_batch.image_grid,) * ROWS
  # Reference: the public forward over prompt + target; position t's logits predict token t+1.
  logits = jax.jit(lambda s, ids, mask, pv: nnx.merge(graphdef, s)(ids, mask, pv, grids))(
      state, np.concatenate([seqs.prompt_ids, seqs.completion], 1),
      np.concatenate([seqs.prompt_mask, seqs.completion_mask], 1),
      seqs.pixel_values.reshape(-1, 1176))
  prompt_len = seqs.prompt_ids.shape[1]
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64)[:, prompt_len - 1:-1], axis=-1)
  picked = np.take_along_axis(np.asarray(logp), seqs.completion[..., None], -1)[..., 0]
  mask = seqs.completion_mask.astype(bool)
  want = -picked[mask].mean()

  first = _trainer(mesh)
  metrics = first.step(direct_batch).metrics
  assert metrics["target_tokens"] == mask.sum() == 15 + 4 + 9 + 12
  assert metrics["loss"] == pytest.approx(want, rel=1e-5)
  assert metrics["token_accuracy"] == pytest.approx(np.mean(picked[mask] > np.log(0.5)))

  # Whatever the labels past each row's mask (padding) say, nothing changes.
  rng = np.random.default_rng(0)
  scrambled = np.where(mask, seqs.completion, rng.integers(0, 1000, seqs.completion.shape))
  second = _trainer(mesh)
  other = second.step(dataclasses.replace(direct_batch, seqs=dataclasses.replace(
      seqs, completion=scrambled.astype(np.int32)))).metrics
  assert other["loss"] == metrics["loss"] and other["grad_norm"] == metrics["grad_norm"]
  for a, b in zip(_params(first), _params(second)):
    np.testing.assert_array_equal(a, b)

  # No target token at all: loss 0 and zero gradients, not 0/0.
  empty = _trainer(mesh).step(dataclasses.replace(direct_batch, seqs=dataclasses.replace(
      seqs, completion_mask=np.zeros_like(seqs.completion_mask)))).metrics
  assert (empty["loss"], empty["grad_norm"], empty["target_tokens"]) == (0.0, 0.0, 0)
  assert empty["skipped_non_finite"] == 0.0


def test_micro_batches_accumulate_to_the_full_batch(mesh, direct_batch):
  full, split = _trainer(mesh, micro_batch_size=ROWS), _trainer(mesh, micro_batch_size=2)
  a, b = full.step(direct_batch).metrics, split.step(direct_batch).metrics
  # Rows hold 15+4 and 9+12 tokens: a mean of micro-batch means would be off by ~1%.
  for key in ("loss", "grad_norm", "token_accuracy"):
    assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), key
  # After one update Adam's first moment is (1 − β1) · the clipped gradient, leaf by leaf.
  grads = [[np.asarray(m) / 0.1 for m in jax.tree.leaves(
      optax.tree_utils.tree_get_all_with_path(t.opt_state, "mu")[0][1])] for t in (full, split)]
  assert max(np.abs(g).max() for g in grads[0]) > 1e-3
  for x, y in zip(*grads):
    np.testing.assert_allclose(y, x, rtol=0, atol=1e-6)


def test_sharded_rows_give_the_single_device_step(mesh, direct_batch):
  reference = _trainer(mesh, micro_batch_size=2).step(direct_batch).metrics
  data_mesh = make_mesh(data=2)
  with pytest.raises(ValueError, match="multiple of the data×fsdp = 2 devices"):
    _trainer(data_mesh, micro_batch_size=1)
  trainer = _trainer(data_mesh, micro_batch_size=2)
  first, second = trainer.step(direct_batch).metrics, trainer.step(direct_batch).metrics
  # Summation order differs across devices (~1e-6 relative in f32).
  for key in ("loss", "grad_norm"):
    assert first[key] == pytest.approx(reference[key], rel=1e-5), key
  assert second["loss"] < first["loss"]
  assert trainer.train_step._cache_size() == 1


def test_overfits_a_fixed_batch_without_recompiling(mesh, direct_batch):
  trainer = _trainer(mesh, micro_batch_size=2)
  before = _params(trainer)
  history = [trainer.step(direct_batch).metrics for _ in range(20)]
  losses = [m["loss"] for m in history]
  assert losses[-1] < 0.2 * losses[0], losses
  assert history[-1]["token_accuracy"] > 0.25 > history[0]["token_accuracy"]
  assert trainer.train_step._cache_size() == 1
  assert history[-1]["compiles/sft_step"] == 1.0
  assert history[-1]["learning_rate"] == pytest.approx(LEARNING_RATE)
  assert all(m["tokens_per_second"] > 0 for m in history)
  # The model object itself holds the trained parameters (e.g. for the sampler or evaluation).
  after = [np.asarray(x) for x in jax.tree.leaves(nnx.state(trainer.model, nnx.Param))]
  assert not all(np.array_equal(x, y) for x, y in zip(before, after))
  for x, y in zip(_params(trainer), after):
    np.testing.assert_array_equal(x, y)


def test_a_non_finite_step_leaves_the_parameters(mesh, direct_batch):
  trainer = _trainer(mesh, micro_batch_size=2)
  before = _params(trainer)
  poisoned = dataclasses.replace(direct_batch, seqs=dataclasses.replace(
      direct_batch.seqs, pixel_values=np.full_like(direct_batch.seqs.pixel_values, np.nan)))
  metrics = trainer.step(poisoned).metrics
  assert metrics["skipped_non_finite"] == 1.0 and trainer.bad_steps == 1
  for x, y in zip(before, _params(trainer)):
    np.testing.assert_array_equal(x, y)
  trainer.step(direct_batch)
  assert trainer.bad_steps == 0


# ---------------------------------------------------------------------------------------------
# The loop.


def _run(data_dir, tokenizer, mesh, workdir, total_steps: int, *, data=None):
  optimizer, schedule = _optimizer()
  model = init_model(config_lib.tiny(), seed=0, mesh=mesh)
  questions = sft.SplitQuestions(data_dir, "train")
  config = sft.SftConfig(total_steps=total_steps, targets=questions.target_config("direct"),
                         target_buckets=(16,), micro_batch_size=2,
                         loop=LoopSettings(checkpoint_every=1), meta={"test": True})
  history = sft.run_sft(model, optimizer, data or iter(_loader(data_dir)), tokenizer, config,
                        workdir, mesh, questions=questions, lr_schedule=schedule)
  return history, model


def test_run_sft_checkpoints_logs_and_resumes_exactly(data_dir, tokenizer, mesh, tmp_path):
  straight, straight_model = _run(data_dir, tokenizer, mesh, tmp_path / "straight", 3)
  assert [m["step"] for m in straight] == [1, 2, 3]

  workdir = tmp_path / "resumed"
  first, _ = _run(data_dir, tokenizer, mesh, workdir, 2)
  second, resumed_model = _run(data_dir, tokenizer, mesh, workdir, 3)
  assert [m["step"] for m in first] == [1, 2] and [m["step"] for m in second] == [3]
  # Same parameters, optimizer state and data position: the same third step.
  assert second[0]["loss"] == pytest.approx(straight[2]["loss"], rel=1e-6)
  for x, y in zip(jax.tree.leaves(nnx.state(straight_model, nnx.Param)),
                  jax.tree.leaves(nnx.state(resumed_model, nnx.Param))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)

  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert {"loss", "token_accuracy", "tokens_per_second", "learning_rate", "grad_norm"} <= set(
      rows[-1])
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
      "1", "2", "3"]
  meta = json.loads(next((workdir / "checkpoints" / "3" / "meta").glob("*")).read_text())
  assert meta["stage"] == "sft" and meta["config"] == {"test": True, "target": "direct"}
  # Done: running again trains nothing.
  again, _ = _run(data_dir, tokenizer, mesh, workdir, 3)
  assert again == []
