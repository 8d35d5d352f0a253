"""The question record stored in the extractor's ArrayRecord shards, and its reader.

Schema version 1. One record is one question with its image, serialised without pickle as::

    b"RR1Q"                      4-byte magic
    uint32, little-endian        N = length of the JSON header in bytes
    N bytes                      UTF-8 JSON object, keys sorted, no whitespace
    the remaining bytes          the image, PNG-encoded (uint8 RGB, the extractor's image_size)

The JSON object holds "schema_version" (1), "variation" (int) and every field of
`mcqa.Question`: prompt (the user message text), options (list of 4 option texts, [] when
open-ended), answer (exact <answer> content: "[[B]]", "[x, y, z]" or bins "153 149 18"),
answer_letter ("B" or null), question_type ("waypoint" | "current_state" | "movement"),
answer_format ("mcqa" | "xyz" | "action_tokens"), task, episode (e.g.
"pick_up_cup/variation0/episode3"), frame, next_keyframe, description, camera, state_xyz,
next_xyz ([x, y, z] floats, metres), target_xyz ([x, y, z] or null), target_tokens ([i, j, k] or
null). Decoding needs only this module; `read_records` reads a whole shard.

An extractor output folder holds the shards and `manifest.json` (`Manifest`: splits, shards with
their sha256, skipped episodes, the extraction config). `open_split` is how every reader (the
loader, SFT's question lookup) opens one split of it, with the same checks.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import struct
from typing import Any, Iterator

from array_record.python.array_record_module import ArrayRecordReader
import numpy as np
from PIL import Image, UnidentifiedImageError

from robot_r1_jax.data.mcqa import McqaConfig, Question

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MAGIC = b"RR1Q"
_HEADER = struct.Struct("<4sI")
# Shards are read by random access (grain), so each record is its own chunk group.
WRITER_OPTIONS = "group_size:1"


class RecordError(ValueError):
  """A record's bytes are not a schema-version-1 question record."""


@dataclasses.dataclass(frozen=True)
class Record:
  question: Question
  variation: int
  image_png: bytes

  def image(self) -> np.ndarray:
    """The image as uint8 [H, W, 3]."""
    try:
      with Image.open(io.BytesIO(self.image_png)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
      raise RecordError(f"record of {self.question.episode} frame {self.question.frame}: "
                        f"unreadable PNG ({e})") from e


def encode_record(record: Record) -> bytes:
  """Deterministic bytes: the same record always encodes identically."""
  header = dict(record.question.to_dict(), schema_version=SCHEMA_VERSION,
                variation=record.variation)
  text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                    allow_nan=False).encode()
  return _HEADER.pack(MAGIC, len(text)) + text + record.image_png


def decode_record(data: bytes) -> Record:
  """Inverse of `encode_record`; raises RecordError on anything else."""
  if len(data) < _HEADER.size:
    raise RecordError(f"record of {len(data)} bytes is shorter than its header")
  magic, length = _HEADER.unpack_from(data)
  if magic != MAGIC:
    raise RecordError(f"record starts with {magic!r}, expected {MAGIC!r}")
  end = _HEADER.size + length
  if end > len(data):
    raise RecordError(f"record header claims {length} JSON bytes but only "
                      f"{len(data) - _HEADER.size} follow")
  try:
    header = json.loads(data[_HEADER.size:end])
    version = header.pop("schema_version")
    variation = header.pop("variation")
    question = Question.from_dict(header)
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise RecordError(f"record JSON is not a question: {e}") from e
  if version != SCHEMA_VERSION:
    raise RecordError(f"record schema_version={version}; this reader understands "
                      f"{SCHEMA_VERSION}")
  return Record(question=question, variation=variation, image_png=bytes(data[end:]))


def read_records(shard_path: str | pathlib.Path) -> Iterator[Record]:
  """Every record of one ArrayRecord shard, in order."""
  path = pathlib.Path(shard_path)
  if not path.is_file():
    raise FileNotFoundError(f"shard {path} does not exist")
  reader = ArrayRecordReader(str(path))
  try:
    total = reader.num_records()
    for start in range(0, total, 64):
      for data in reader.read(start, min(start + 64, total)):
        yield decode_record(data)
  finally:
    reader.close()


# ------------------------------------------------------------------------------------------------
# The extractor output: manifest.json and its splits.


@dataclasses.dataclass(frozen=True)
class ShardInfo:
  path: str  # Relative to the output folder.
  num_records: int
  sha256: str


@dataclasses.dataclass(frozen=True)
class SplitInfo:
  num_records: int
  shards: tuple[ShardInfo, ...]
  episodes: tuple[str, ...]
  by_task: dict[str, int]
  by_type: dict[str, int]


@dataclasses.dataclass(frozen=True)
class SkippedEpisode:
  episode: str
  path: str  # Relative to the demo folder.
  reason: str


@dataclasses.dataclass(frozen=True)
class InstructionSource:
  """Where one variation's task instruction came from."""

  source: str  # "file": descriptions[0] of `file`; "task_name": made from the task folder's name.
  instruction: str  # What the prompts say (the first one, when an all_variations episode differs).
  file: str  # The descriptions file, relative to the demo folder.
  problem: str | None = None  # Why the file was not used (source "task_name").


@dataclasses.dataclass(frozen=True)
class Manifest:
  """manifest.json. `schema_version` is the record schema (`SCHEMA_VERSION`)."""

  schema_version: int
  record_format: str
  demos_dir: str
  config: dict[str, Any]
  episodes_found: int
  splits: dict[str, SplitInfo]
  skipped: tuple[SkippedEpisode, ...]
  # "<task>/variation<N>" -> its instruction's source; absent from manifests written before it.
  instructions: dict[str, InstructionSource] = dataclasses.field(default_factory=dict)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

  @property
  def questions(self) -> McqaConfig:
    """How the questions were cut and worded (answer format, bins, prompt style, metadata)."""
    return McqaConfig.from_dict(self.config.get("mcqa", {}))

  @classmethod
  def load(cls, out_dir: str | pathlib.Path) -> Manifest:
    """Reads `<out_dir>/manifest.json`; errors name the file."""
    path = pathlib.Path(out_dir) / MANIFEST
    try:
      data = json.loads(path.read_text())
      version = data.get("schema_version")
      if version != SCHEMA_VERSION:
        raise ValueError(f"schema_version={version}, this code reads {SCHEMA_VERSION}")
      splits = {name: SplitInfo(**dict(split, episodes=tuple(split["episodes"]),
                                       shards=tuple(ShardInfo(**s) for s in split["shards"])))
                for name, split in data["splits"].items()}
      instructions = {name: InstructionSource(**source)
                      for name, source in data.get("instructions", {}).items()}
      return cls(**dict(data, splits=splits, instructions=instructions,
                        skipped=tuple(SkippedEpisode(**s) for s in data["skipped"])))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"{path}: not a usable manifest ({type(e).__name__}: {e})") from e

  def shard_paths(self, out_dir: str | pathlib.Path, split: str) -> list[pathlib.Path]:
    """The shard files of `split` ("train" or "val") under `out_dir`, in record order."""
    return [pathlib.Path(out_dir) / shard.path for shard in self.splits[split].shards]


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of an extractor output, opened for random access by record index."""

  data_dir: pathlib.Path
  name: str
  manifest: Manifest
  paths: tuple[pathlib.Path, ...]  # the shards, in record order
  source: Any  # grain.sources.ArrayRecordDataSource: record index -> record bytes

  @property
  def info(self) -> SplitInfo:
    return self.manifest.splits[self.name]

  def __len__(self) -> int:
    return len(self.source)


def open_split(data_dir: str | pathlib.Path, split: str) -> Split:
  """Opens `split` of the extractor output in `data_dir`, checked against its manifest.

  Raises:
    ValueError: a bad manifest, no such split, an empty split, or shards holding another number of
      records than the manifest says.
    FileNotFoundError: no manifest.json, or a shard it lists is missing.
  """
  data_dir = pathlib.Path(data_dir)
  manifest = Manifest.load(data_dir)
  if split not in manifest.splits:
    raise ValueError(f"{data_dir / MANIFEST} has no split {split!r}; it has "
                     f"{sorted(manifest.splits)}")
  num_records = manifest.splits[split].num_records
  if num_records == 0:
    raise ValueError(f"split {split!r} of {data_dir} has no records (see {MANIFEST})")
  paths = manifest.shard_paths(data_dir, split)
  for path in paths:
    if not path.is_file():
      raise FileNotFoundError(f"shard {path} listed in {data_dir / MANIFEST} does not exist")
  import grain  # here, not at the top: 1.5 s that the extractor (which never reads) would pay

  source = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
  if len(source) != num_records:
    raise ValueError(f"the {split!r} shards under {data_dir} hold {len(source)} records but "
                     f"{MANIFEST} says {num_records}; re-run the extractor")
  return Split(data_dir=data_dir, name=split, manifest=manifest, paths=tuple(paths),
               source=source)
