"""Offline extractor: RLBench demo tree -> Robot-R1 question shards (ArrayRecord) + manifest.json.

The writer and its command line; the record schema, the manifest and how a split is read back
live in `records`.

    python -m robot_r1_jax.data.extract --demos DIR --out DIR [--tasks a,b] [--camera front]
        [--frame_interval 10] [--image_size 224] [--val_fraction 0.1] [--seed 0]

Output (`--out`, replaced atomically; an existing folder is only replaced if it holds a manifest)::

    manifest.json                  counts, splits, shards (+ sha256), skipped episodes, flags
    train-00000.array_record …     records as documented in `records` (schema version 1)
    val-00000.array_record …

Episodes are split between train and val as whole episodes (per task, a seeded choice of
round(val_fraction · n) episodes goes to val), so no episode's frames leak across splits. An episode
that cannot be used (unreadable or refused pickle, missing image, too short…) is skipped and listed
in the manifest with the reason; it never stops the run, and the end of the run summarises the
skips by reason. When no episode is usable the run fails (`ExtractionError`, exit status 1) and
leaves `--out` as it was. A variation whose `variation_descriptions.pkl` is missing, unreadable or
not a list of str (older RLBench datasets pickle other objects there) keeps its episodes: their
instruction is made from the task name, with one warning per variation, and the manifest's
`instructions` says per variation where its instruction came from. The output depends only on the
demos and the flags: running twice gives byte-identical files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import pathlib
import re
import sys
from typing import Any, Sequence

from absl import app
from absl import flags
from array_record.python.array_record_module import ArrayRecordWriter
import numpy as np
from PIL import Image
import tqdm

from robot_r1_jax.data import atomic
from robot_r1_jax.data import records
from robot_r1_jax.data.demo import DemoError
from robot_r1_jax.data.keyframes import discover_keyframes
from robot_r1_jax.data.mcqa import (ANSWER_FORMATS, QUESTION_TYPES, McqaConfig, Question,
                                    episode_questions)
from robot_r1_jax.data.rlbench_io import (EpisodeRef, encode_png, list_episodes, load_demo,
                                          load_variation_descriptions, task_instruction)

SPLITS = ("train", "val")


class ExtractionError(DemoError):
  """No episode gave a question; the output folder was left as it was."""


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
  """Extraction settings; the field names are the CLI's flag names."""

  tasks: tuple[str, ...] | None = None  # None: every task folder.
  camera: str = "front"
  image_size: int = 224  # Square side in pixels; 0 keeps the source size.
  val_fraction: float = 0.1
  seed: int = 0
  shard_size: int = 1024  # Records per shard.
  mcqa: McqaConfig = McqaConfig()
  progress: bool = True  # Show a progress bar (does not change the output).

  def __post_init__(self):
    if not 0.0 <= self.val_fraction <= 1.0:
      raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1]")
    if self.image_size < 0:
      raise ValueError(f"image_size={self.image_size} must be >= 0")
    if self.shard_size < 1:
      raise ValueError(f"shard_size={self.shard_size} must be >= 1")


def extract(demos_dir: str | pathlib.Path, out_dir: str | pathlib.Path,
            config: ExtractConfig = ExtractConfig()) -> records.Manifest:
  """Builds the question shards of every episode under `demos_dir` into `out_dir` (atomically)."""
  demos_dir, out_dir = pathlib.Path(demos_dir).resolve(), pathlib.Path(out_dir).resolve()
  _check_output(demos_dir, out_dir)
  refs = list_episodes(demos_dir, config.tasks)
  if not refs:
    raise DemoError(f"no episodes under {demos_dir} (expected <task>/variation<N>/episodes/"
                    "episode<K>/ or <task>/all_variations/episodes/episode<K>/)")
  split_of = split_episodes(refs, config.val_fraction, config.seed)
  skipped = []
  instructions = _Instructions(demos_dir)
  with atomic.directory(out_dir) as tmp:
    writers = {split: _ShardWriter(tmp, split, config.shard_size) for split in SPLITS}
    for ref in tqdm.tqdm(refs, desc="extract", unit="episode", disable=not config.progress):
      try:
        episode_records = _episode_records(ref, config, instructions)
      except Exception as e:  # A bad episode must never stop the run; report it instead.
        reason = f"{type(e).__name__}: {e}"
        logging.warning("skipping %s: %s", ref.name, reason)
        skipped.append(records.SkippedEpisode(
            ref.name, str(ref.episode_dir.relative_to(demos_dir)), reason))
        continue
      writers[split_of[ref.name]].add(ref.name, episode_records)
    if len(skipped) == len(refs):  # Raising here keeps the previous output in place.
      raise ExtractionError(f"no question written, nothing replaced in {out_dir}: "
                            + skip_summary(len(refs), skipped))
    manifest = records.Manifest(
        schema_version=records.SCHEMA_VERSION,
        record_format=("b'RR1Q' + uint32-le JSON length + JSON question (sorted keys) + PNG; see "
                       "robot_r1_jax.data.records"),
        demos_dir=str(demos_dir), config=_config_dict(config), episodes_found=len(refs),
        splits={split: writer.close() for split, writer in writers.items()},
        skipped=tuple(skipped), instructions=dict(sorted(instructions.sources.items())))
    (tmp / records.MANIFEST).write_text(manifest.to_json())
  return manifest


def skip_summary(episodes_found: int, skipped: Sequence[records.SkippedEpisode],
                 examples: int = 3) -> str:
  """"skipped K of N episode(s)", then per reason (largest group first) its count, the first few
  episode paths and the first full message."""
  groups: dict[str, list[records.SkippedEpisode]] = {}
  for skip in skipped:
    groups.setdefault(_reason_kind(skip), []).append(skip)
  lines = [f"skipped {len(skipped)} of {episodes_found} episode(s)"]
  for kind, group in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
    paths = ", ".join(skip.path for skip in group[:examples])
    lines.append(f"  {len(group)} × {kind}: {paths}{', …' if len(group) > examples else ''}")
    lines.append(f"      e.g. {group[0].reason}")
  return "\n".join(lines)


def _reason_kind(skip: records.SkippedEpisode) -> str:
  """A skip's reason without what varies between episodes (their folder, counts, the parser's
  detail in parentheses), so that one fault across many episodes forms one group."""
  kind = skip.reason.split(" (", 1)[0]
  kind = re.sub(r"\S*" + re.escape(skip.path) + r"/?", "<episode>/", kind)
  return re.sub(r"\d+", "N", kind)


class _Instructions:
  """Each variation's task instruction: the first entry of its descriptions file or, when that file
  is missing, unreadable or not a non-empty list of str, one made from the task name (the
  descriptions only phrase the prompt's task line, so the episodes stay usable). Each file is read
  once; one warning per variation; `sources` is the manifest's `instructions`."""

  def __init__(self, demos_dir: pathlib.Path):
    self._demos_dir = demos_dir
    self._by_file: dict[pathlib.Path, records.InstructionSource] = {}
    self.sources: dict[str, records.InstructionSource] = {}

  def __call__(self, ref: EpisodeRef, variation: int) -> str:
    path = ref.descriptions_path
    if path not in self._by_file:
      file = str(path.relative_to(self._demos_dir))
      try:
        self._by_file[path] = records.InstructionSource(
            "file", load_variation_descriptions(path.parent)[0], file)
      except DemoError as e:  # The allow-list still refused whatever the file names.
        self._by_file[path] = records.InstructionSource(
            "task_name", task_instruction(ref.task), file, f"{type(e).__name__}: {e}")
    source = self._by_file[path]
    key = f"{ref.task}/variation{variation}"
    known = self.sources.get(key)
    if known is None or (known.problem is None and source.problem is not None):
      # all_variations holds one file per episode: a variation counts as falling back when any does.
      self.sources[key] = source
      if source.problem is not None:
        logging.warning("%s: %s; its episodes are extracted with the instruction %r made from the "
                        "task name", key, source.problem, source.instruction)
    return source.instruction


def split_episodes(refs: Sequence[EpisodeRef], val_fraction: float, seed: int) -> dict[str, str]:
  """Episode name -> "train" | "val": per task, a seeded round(val_fraction · n) go to val.

  Decided before any episode is read, so one episode's fault never moves another across splits.
  """
  by_task: dict[str, list[str]] = {}
  for ref in refs:
    by_task.setdefault(ref.task, []).append(ref.name)
  split = {}
  for task, names in by_task.items():
    names = sorted(names)
    digest = hashlib.sha256(f"{seed}\x1f{task}".encode()).digest()
    order = np.random.default_rng(int.from_bytes(digest[:16], "little")).permutation(len(names))
    num_val = math.floor(val_fraction * len(names) + 0.5)
    for rank, index in enumerate(order):
      split[names[index]] = "val" if rank < num_val else "train"
  return split


def _episode_records(ref: EpisodeRef, config: ExtractConfig,
                     instructions: _Instructions) -> list[tuple[Question, bytes]]:
  variation = ref.variation_number()
  description = instructions(ref, variation)
  demo = load_demo(ref.episode_dir, config.camera)
  if len(demo) < 2:
    raise DemoError(f"too short: {len(demo)} observation(s)")
  questions = episode_questions(demo, discover_keyframes(demo), task=ref.task, episode=ref.name,
                                description=description, seed=config.seed,
                                config=config.mcqa, camera=config.camera)
  if not questions:
    raise DemoError("no questions: the gripper never moves between keyframes")
  images = {}
  for frame in sorted({q.frame for q in questions}):
    images[frame] = encode_png(_resize(demo.image(frame), config.image_size))
  return [(q, records.encode_record(records.Record(q, variation, images[q.frame])))
          for q in questions]


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  if size == 0 or image.shape[:2] == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


class _ShardWriter:
  """Writes one split's records into shards of at most `shard_size` records."""

  def __init__(self, folder: pathlib.Path, split: str, shard_size: int):
    self._folder, self._split, self._shard_size = folder, split, shard_size
    self._writer: ArrayRecordWriter | None = None
    self._shards: list[tuple[str, int]] = []
    self._episodes: list[str] = []
    self._by_task: dict[str, int] = {}
    self._by_type: dict[str, int] = {}

  def add(self, episode: str, episode_records: list[tuple[Question, bytes]]) -> None:
    self._episodes.append(episode)
    for question, data in episode_records:
      if self._writer is None or self._shards[-1][1] == self._shard_size:
        self._close_current()
        name = f"{self._split}-{len(self._shards):05d}.array_record"
        self._writer = ArrayRecordWriter(str(self._folder / name), records.WRITER_OPTIONS)
        self._shards.append((name, 0))
      self._writer.write(data)
      self._shards[-1] = (self._shards[-1][0], self._shards[-1][1] + 1)
      self._by_task[question.task] = self._by_task.get(question.task, 0) + 1
      self._by_type[question.question_type] = self._by_type.get(question.question_type, 0) + 1

  def _close_current(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def close(self) -> records.SplitInfo:
    self._close_current()
    shards = tuple(records.ShardInfo(
        name, count, hashlib.sha256((self._folder / name).read_bytes()).hexdigest())
                   for name, count in self._shards)
    return records.SplitInfo(
        num_records=sum(s.num_records for s in shards), shards=shards,
        episodes=tuple(self._episodes), by_task=dict(sorted(self._by_task.items())),
        by_type=dict(sorted(self._by_type.items())))


def _check_output(demos_dir: pathlib.Path, out_dir: pathlib.Path) -> None:
  if out_dir == demos_dir or demos_dir.is_relative_to(out_dir):
    raise ValueError(f"--out {out_dir} would replace the demos in --demos {demos_dir}")
  if out_dir.exists() and not out_dir.is_dir():
    raise ValueError(f"--out {out_dir} exists and is not a folder")
  if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / records.MANIFEST).is_file():
    raise ValueError(f"--out {out_dir} exists and is not an extractor output (no "
                     f"{records.MANIFEST}); refusing to replace it")


def _config_dict(config: ExtractConfig) -> dict[str, Any]:
  data = dataclasses.asdict(config)
  del data["progress"]  # Not part of what determines the output.
  return json.loads(json.dumps(data))  # Tuples become lists, as after reading manifest.json.


# ------------------------------------------------------------------------------------------------
# Command line. Flags are defined only when run as a program, so importing `extract` from the
# trainer adds nothing to its flags.


def _define_flags() -> None:
  flags.DEFINE_string("demos", None, "RLBench demo folder (one sub-folder per task).",
                      required=True)
  flags.DEFINE_string("out", None, "Output folder for shards and manifest.json.", required=True)
  flags.DEFINE_list("tasks", None, "Tasks to extract (default: all under --demos).")
  flags.DEFINE_string("camera", "front", "Camera whose <camera>_rgb images are used.")
  flags.DEFINE_integer("frame_interval", 10, "Ask about a state every this many frames.")
  flags.DEFINE_integer("image_size", 224, "Square image side in pixels (0: keep the source size).")
  flags.DEFINE_float("val_fraction", 0.1, "Fraction of each task's episodes held out for val "
                     "(1: a test set of fresh episodes, every one in val).")
  flags.DEFINE_integer("seed", 0, "Seed for option shuffles, distractors and the split.")
  flags.DEFINE_integer("shard_size", 1024, "Records per ArrayRecord shard.")
  flags.DEFINE_enum("answer_format", "mcqa", list(ANSWER_FORMATS),
                    "mcqa: options [[A]]..[[D]]; xyz: open-ended positions [x, y, z]; "
                    "action_tokens: the position as RT-2's bins, three numbers 'i j k' "
                    "(--action_bins per axis over the workspace, stated in the prompt). The "
                    "open-ended formats ask no movement questions.")
  flags.DEFINE_integer("action_bins", 256, "Bins per workspace axis of --answer_format="
                       "action_tokens.")
  flags.DEFINE_list("question_types", list(QUESTION_TYPES),
                    "Question types to ask. A subset asks the same questions as the full set "
                    "(each is seeded by its frame and type), e.g. movement alone for an RL stage "
                    "whose evaluation uses a full extraction.")
  flags.DEFINE_enum("prompt_style", "paper", ["paper", "compact"],
                    "paper: Robot-R1's prompt; compact: only the task, current state and question "
                    "(for small models trained from scratch on a CPU).")
  flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  values = flags.FLAGS
  try:
    config = ExtractConfig(
        tasks=tuple(values.tasks) if values.tasks else None, camera=values.camera,
        image_size=values.image_size, val_fraction=values.val_fraction, seed=values.seed,
        shard_size=values.shard_size, progress=values.progress,
        mcqa=McqaConfig(frame_interval=values.frame_interval, answer_format=values.answer_format,
                        action_bins=values.action_bins, question_types=tuple(values.question_types),
                        prompt_style=values.prompt_style))
  except ValueError as e:  # Field names are flag names, so the message names the flag.
    raise app.UsageError(f"--{e}") from e
  try:
    manifest = extract(values.demos, values.out, config)
  except DemoError as e:  # No usable demos (or none at all): say so without a traceback.
    sys.exit(f"extract: {e}")
  for split, info in manifest.splits.items():
    print(f"{split}: {info.num_records} questions from {len(info.episodes)} episodes in "
          f"{len(info.shards)} shard(s)")
  if manifest.skipped:
    print(skip_summary(manifest.episodes_found, manifest.skipped)
          + f"\n  (every reason in {pathlib.Path(values.out) / records.MANIFEST})")
  fallbacks = [key for key, source in manifest.instructions.items() if source.problem]
  if fallbacks:
    print(f"{len(fallbacks)} variation(s) use an instruction made from the task name (their "
          f"descriptions file is unusable): {', '.join(fallbacks)}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
