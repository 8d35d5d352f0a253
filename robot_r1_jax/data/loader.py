"""Grain input pipeline: the extractor's question shards -> bucket-padded model-input batches.

    loader = make_loader(data_dir, "train", LoaderConfig(batch_size=8))
    it = iter(loader)              # a grain DatasetIterator
    batch = next(it)               # Batch: input_ids [B, T], pixel_values [B·P, 1176], answers …
    state = it.get_state()         # JSON-able; a fresh iter(loader).set_state(state) resumes here

Checkpoint the iterator with grain's orbax handler (`grain.checkpoint.CheckpointSave(it)` /
`CheckpointRestore(it)`, one `process_<i>-of-<n>.json` per process).

The pipeline, for one process of c (`ShardByJaxProcess`), batch size B and N records in the split:

1. Order: record indices 0…N-1 in a seeded permutation that changes every epoch (grain's `shuffle`
   before `repeat` reseeds each epoch), repeated: one global stream, identical on every process.
2. Shard: process i takes stream positions i, i+c, i+2c, …, so within every epoch the processes'
   records are disjoint and together cover the split. Every process gets the same number of
   batches (multi-host steps must agree):
     drop_remainder=True:  floor(E·N / (c·B)) batches for E epochs; the < c·B positions left at the
                           very end are dropped.
     drop_remainder=False: ceil(E·N / (c·B)) batches; the positions past E·N are filled with
                           records of the following epoch marked `valid=False` (for evaluation:
                           leave them out of the metrics). Shapes stay fixed either way.
   With num_epochs=None the stream never ends and drop_remainder does not matter.
3. Example: a record is decoded, its PNG turned into patches (`processor.preprocess_image`) and its
   prompt into ids (`processor.build_prompt_ids`: chat template, one <|image_pad|> per merged
   vision token).
4. Batch: prompts are left-padded to the smallest declared length bucket that holds the batch's
   longest, so a jitted step compiles at most once per bucket; images are stacked as [B·P, 1176].
5. Workers (optional): whole batches are built in `worker_count` spawned processes (grain's
   `mp_prefetch`); the batch sequence is the same as with 0 workers. The program that creates the
   iterator needs an `if __name__ == "__main__":` guard, or the spawned workers hang it.

Decisions:
  * A prompt longer than the largest bucket is an error naming the record, its shard and the
    bucket, not a skip: skipping would silently drop whichever question type has long prompts and
    make the number of steps depend on the data. Add a larger bucket instead.
  * All images of a batch must have one grid (the extractor resizes every image to --image_size);
    mixed grids are an error naming the records. Padding patches would need a per-image patch mask
    that neither the model nor the learner takes.
  * Epochs are not batch-aligned: a batch may hold the end of one epoch and the start of the next
    (grain's repeat-then-batch), so `epochs` is per row.

Dimensions: B batch (per process) · T prompt length (a bucket) · P vision patches per image.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import math
import pathlib
import threading
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence

from absl import flags
import grain
import jax
import numpy as np

from robot_r1_jax.data import records
from robot_r1_jax.data.mcqa import Question
from robot_r1_jax.model import processor

if TYPE_CHECKING:
  from transformers import PreTrainedTokenizerBase


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
  """Loader settings; field names are meant to be the trainer's flag names."""

  batch_size: int = 8  # B per process; the global batch is B × process count.
  seed: int = 0  # Shuffle seed, in [0, 2**32).
  shuffle: bool = True  # False: records in manifest order (evaluation).
  num_epochs: int | None = None  # None: repeat forever.
  drop_remainder: bool = True  # False: pad the last batch with valid=False rows (evaluation).
  # Increasing prompt lengths T. The defaults are the sampler's prompt buckets, so the sampler
  # never re-pads a loader batch.
  length_buckets: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096)
  min_pixels: int = processor.MIN_PIXELS
  max_pixels: int = processor.MAX_PIXELS
  tokenizer_path: str | None = None  # None: the packaged tiny tokenizer (tests, smoke runs).
  shard_by_process: bool = True  # False: every process reads the whole split.
  worker_count: int = 0  # Spawned grain worker processes; 0 builds batches in this process.
  worker_buffer_size: int = 2  # Batches buffered per worker.
  read_threads: int = 1  # Threads per process building batches (grain ReadOptions.num_threads).
  prefetch_batches: int = 2  # Batches buffered per process (grain prefetch_buffer_size).

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"batch_size={self.batch_size} must be >= 1")
    if not 0 <= self.seed < 2**32:
      raise ValueError(f"seed={self.seed} must be in [0, 2**32)")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f"num_epochs={self.num_epochs} must be >= 1, or None to repeat forever")
    buckets = self.length_buckets
    if not buckets or buckets[0] < 1 or list(buckets) != sorted(set(buckets)):
      raise ValueError(f"length_buckets={buckets} must be a non-empty, strictly increasing tuple "
                       "of positive lengths")
    if not 0 < self.min_pixels <= self.max_pixels:
      raise ValueError(f"min_pixels={self.min_pixels} and max_pixels={self.max_pixels} must "
                       "satisfy 0 < min_pixels <= max_pixels")
    for name in ("worker_count", "read_threads", "prefetch_batches"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
    if self.worker_buffer_size < 1:
      raise ValueError(f"worker_buffer_size={self.worker_buffer_size} must be >= 1")


# A pytree, so that grain's workers hand its arrays over in shared memory instead of pickling them
# (pixel_values is ~1.2 MB per 224x224 image), and so that jax.tree functions see the arrays.
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
  """One batch of prompts with everything the sampler, the reward and the metrics need."""

  input_ids: np.ndarray  # int32 [B, T], left-padded with the tokenizer's pad id; T a bucket
  attention_mask: np.ndarray  # int32 [B, T], 1 on prompt tokens, 0 on padding
  pixel_values: np.ndarray  # float32 [B·P, 1176]; row b's patches are rows [b·P, (b+1)·P)
  image_grid_thw: np.ndarray  # int32 [B, 3], (t, h, w) per image, P = t·h·w
  answers: np.ndarray  # str [B], the exact <answer> content: "[[B]]", "[x, y, z]" or "153 149 18"
  question_types: np.ndarray  # str [B], "waypoint" | "current_state" | "movement"
  tasks: np.ndarray  # str [B]
  episodes: np.ndarray  # str [B], e.g. "pick_up_cup/variation0/episode3"
  frames: np.ndarray  # int32 [B]
  record_indices: np.ndarray  # int64 [B], the record's index in the split (manifest order)
  epochs: np.ndarray  # int32 [B], the pass over the split the row belongs to
  valid: np.ndarray  # bool [B], False only on padding rows (drop_remainder=False)


@dataclasses.dataclass(frozen=True)
class Loader:
  """The batches of one split for this process. `iter(loader)` starts a new grain iterator."""

  dataset: grain.IterDataset  # of Batch
  num_records: int  # N, records in the split (all processes together)
  shard: grain.sharding.ShardOptions  # This process's place among the readers.
  steps_per_epoch: int  # Batches per process for one pass over the split.
  num_steps: int | None  # Batches per process in total; None when repeating forever.

  def __iter__(self) -> grain.DatasetIterator:
    return iter(self.dataset)


def make_loader(data_dir: str | pathlib.Path, split: str, config: LoaderConfig = LoaderConfig(),
                *, shard: grain.sharding.ShardOptions | None = None) -> Loader:
  """The loader of `split` ("train" or "val") of an extractor output folder.

  Args:
    data_dir: the extractor's `--out` folder (manifest.json + shards).
    split: a split named in the manifest.
    config: see `LoaderConfig`.
    shard: this process's shard; default `ShardByJaxProcess()` (or `NoSharding()` when
      `config.shard_by_process` is False). Only shard_index and shard_count are used:
      `config.drop_remainder` decides what happens to a remainder (see the module docstring).

  Raises:
    ValueError: a bad manifest or split, shards that disagree with it, or a split too small for
      one batch.
    FileNotFoundError: no manifest.json, a missing shard, or `config.tokenizer_path` is not a
      directory.
  """
  opened = records.open_split(data_dir, split)
  num_records = len(opened)
  if shard is None:
    shard = (grain.sharding.ShardByJaxProcess() if config.shard_by_process else
             grain.sharding.NoSharding())
  steps_per_epoch = _num_steps(num_records, shard.shard_count, config)
  num_steps = (None if config.num_epochs is None else
               _num_steps(config.num_epochs * num_records, shard.shard_count, config))
  if steps_per_epoch == 0:
    raise ValueError(f"split {split!r} of {data_dir} has {num_records} records, fewer than one "
                     f"batch_size={config.batch_size} for each of {shard.shard_count} process(es) "
                     "(lower batch_size, or set drop_remainder=False)")

  tokenizer = processor.load_tokenizer(config.tokenizer_path)
  if tokenizer.pad_token_id is None:
    raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad token to left-pad with")
  if config.worker_count and not flags.FLAGS.is_parsed():
    # grain reads its own absl flags when it starts workers and would fail there, less clearly.
    raise ValueError(f"worker_count={config.worker_count} needs parsed absl flags: run under "
                     "absl.app.run, or call absl.flags.FLAGS.mark_as_parsed() first")
  return Loader(dataset=_pipeline(opened, tokenizer, config, shard, num_steps),
                num_records=num_records, shard=shard, steps_per_epoch=steps_per_epoch,
                num_steps=num_steps)


def _pipeline(split: records.Split, tokenizer: PreTrainedTokenizerBase, config: LoaderConfig,
              shard: grain.sharding.ShardOptions, num_steps: int | None) -> grain.IterDataset:
  """Steps 1–5 of the module docstring, as a grain dataset of `Batch`."""
  # 1–2. This process's stream of record indices.
  positions = grain.MapDataset.range(len(split))
  if config.shuffle:
    positions = positions.shuffle(config.seed)
  positions = positions.repeat()[shard.shard_index::shard.shard_count]
  if num_steps is not None:
    positions = positions[:num_steps * config.batch_size]
  # 3–4. Records → examples → bucket-padded batches.
  examples = positions.map_with_index(_MakeExample(split, tokenizer, config, shard=shard))
  batches = examples.batch(config.batch_size, drop_remainder=True,
                           batch_fn=_Collate(config.length_buckets, tokenizer.pad_token_id))
  dataset = batches.to_iter_dataset(grain.ReadOptions(
      num_threads=config.read_threads, prefetch_buffer_size=config.prefetch_batches))
  # 5. Worker processes.
  if config.worker_count:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
  return dataset


def _num_steps(positions: int, shard_count: int, config: LoaderConfig) -> int:
  """Batches per process for `positions` stream positions shared by `shard_count` processes."""
  per_step = shard_count * config.batch_size
  return positions // per_step if config.drop_remainder else math.ceil(positions / per_step)


@dataclasses.dataclass(frozen=True)
class _Example:
  input_ids: np.ndarray  # int32 [T]
  pixel_values: np.ndarray  # float32 [P, 1176]
  grid_thw: tuple[int, int, int]
  question: Question
  record_index: int
  epoch: int
  valid: bool


class _MakeExample(grain.transforms.MapWithIndex):
  """(position in this process's stream, record index) -> `_Example`.

  Pickled into worker processes without its tokenizer (and lock): each worker loads its own from
  `tokenizer_path` on first use.
  """

  def __init__(self, split: records.Split, tokenizer: PreTrainedTokenizerBase,
               config: LoaderConfig, *, shard: grain.sharding.ShardOptions):
    num_records = len(split)
    self._source = split.source
    self._paths = [str(p) for p in split.paths]
    self._shard_starts = np.cumsum([0] + [s.num_records for s in split.info.shards])[:-1].tolist()
    self._tokenizer_path = config.tokenizer_path
    self._min_pixels, self._max_pixels = config.min_pixels, config.max_pixels
    self._max_length = config.length_buckets[-1]
    self._num_records = num_records
    self._end = None if config.num_epochs is None else config.num_epochs * num_records
    self._shard_index, self._shard_count = shard.shard_index, shard.shard_count
    self._tokenizer: PreTrainedTokenizerBase | None = tokenizer
    self._lock = threading.Lock()

  def __getstate__(self) -> dict[str, object]:
    return dict(self.__dict__, _tokenizer=None, _lock=None)

  def __setstate__(self, state: dict[str, object]) -> None:
    self.__dict__.update(state, _lock=threading.Lock())

  def map_with_index(self, index: int, record_index: int) -> _Example:
    position = self._shard_index + index * self._shard_count  # In the global stream.
    record = self._read(record_index)
    with self._lock:
      if self._tokenizer is None:
        self._tokenizer = processor.load_tokenizer(self._tokenizer_path)
    # Hugging Face tokenizers are not safe to call from several threads at once (the Rust side
    # raises "Already borrowed"), and grain's read threads share this transform.
    example = _example(record.question, record.image(), self._tokenizer,
                       min_pixels=self._min_pixels, max_pixels=self._max_pixels,
                       max_length=self._max_length, tokenizer_lock=self._lock,
                       where=lambda: self._describe(record_index, record.question))
    return dataclasses.replace(example, record_index=record_index,
                               epoch=position // self._num_records,
                               valid=self._end is None or position < self._end)

  def _read(self, record_index: int) -> records.Record:
    try:
      return records.decode_record(self._source[record_index])
    except records.RecordError as e:
      raise records.RecordError(f"{self._describe(record_index)}: {e}") from e

  def _describe(self, record_index: int, question: Question | None = None) -> str:
    shard = bisect.bisect_right(self._shard_starts, record_index) - 1
    where = (f"record {record_index} (#{record_index - self._shard_starts[shard]} of "
             f"{self._paths[shard]})")
    if question is None:
      return where
    return f"{where}, {question.episode} frame {question.frame} {question.question_type}"


def prompt_batch(questions: Sequence[Question], images: Sequence[np.ndarray],
                 tokenizer: PreTrainedTokenizerBase, config: LoaderConfig = LoaderConfig()) -> Batch:
  """A batch of questions asked now (not read from a split: the closed loop's), built exactly as
  the loader builds a split's; `record_indices` count the questions."""
  examples = [dataclasses.replace(
      _example(q, image, tokenizer, min_pixels=config.min_pixels, max_pixels=config.max_pixels,
               max_length=config.length_buckets[-1], where=lambda q=q: f"{q.episode} frame "
               f"{q.frame} {q.question_type}"), record_index=i)
      for i, (q, image) in enumerate(zip(questions, images, strict=True))]
  return _Collate(config.length_buckets, tokenizer.pad_token_id)(examples)


def _example(question: Question, image: np.ndarray, tokenizer: PreTrainedTokenizerBase, *,
             min_pixels: int, max_pixels: int, max_length: int, where: Callable[[], str],
             tokenizer_lock: ContextManager[Any] = contextlib.nullcontext()) -> _Example:
  pixel_values, grid = processor.preprocess_image(image, min_pixels=min_pixels,
                                                  max_pixels=max_pixels)
  with tokenizer_lock:
    input_ids = processor.build_prompt_ids(tokenizer, question.prompt, grid)
  if len(input_ids) > max_length:
    raise ValueError(f"{where()}: the prompt has {len(input_ids)} tokens, more than the largest "
                     f"length bucket {max_length}; add a larger one to length_buckets")
  return _Example(input_ids=input_ids, pixel_values=pixel_values, grid_thw=grid,
                  question=question, record_index=0, epoch=0, valid=True)


class _Collate:
  """`_Example`s -> `Batch`: left-pad to the smallest bucket that fits, stack the images."""

  def __init__(self, buckets: Sequence[int], pad_id: int):
    self._buckets, self._pad_id = tuple(buckets), pad_id

  def __call__(self, examples: Sequence[_Example]) -> Batch:
    grids = sorted({e.grid_thw for e in examples})
    if len(grids) > 1:
      rows = ", ".join(f"record {e.record_index} ({e.question.episode} frame {e.question.frame}) "
                       f"grid {list(e.grid_thw)}" for e in examples if e.grid_thw != grids[0])
      raise ValueError(f"images of one batch differ in size: grid {list(grids[0])} and {rows}; "
                       "extract with one --image_size")
    # _MakeExample has rejected prompts longer than the largest bucket, so one fits.
    length = self._buckets[bisect.bisect_left(self._buckets,
                                              max(len(e.input_ids) for e in examples))]
    input_ids = np.full((len(examples), length), self._pad_id, np.int32)
    attention_mask = np.zeros((len(examples), length), np.int32)
    for row, example in enumerate(examples):
      input_ids[row, length - len(example.input_ids):] = example.input_ids
      attention_mask[row, length - len(example.input_ids):] = 1
    questions = [e.question for e in examples]
    return Batch(
        input_ids=input_ids, attention_mask=attention_mask,
        pixel_values=np.concatenate([e.pixel_values for e in examples]),
        image_grid_thw=np.asarray([e.grid_thw for e in examples], np.int32),
        answers=np.asarray([q.answer for q in questions], str),
        question_types=np.asarray([q.question_type for q in questions], str),
        tasks=np.asarray([q.task for q in questions], str),
        episodes=np.asarray([q.episode for q in questions], str),
        frames=np.asarray([q.frame for q in questions], np.int32),
        record_indices=np.asarray([e.record_index for e in examples], np.int64),
        epochs=np.asarray([e.epoch for e in examples], np.int32),
        valid=np.asarray([e.valid for e in examples], bool))
