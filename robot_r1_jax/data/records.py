"""The question record stored in the extractor's ArrayRecord shards, and its reader.

Schema version 1. One record is one question with its image, serialised without pickle as::

    b"RR1Q"                      4-byte magic
    uint32, little-endian        N = length of the JSON header in bytes
    N bytes                      UTF-8 JSON object, keys sorted, no whitespace
    the remaining bytes          the image, PNG-encoded (uint8 RGB, the extractor's image_size)

The JSON object holds "schema_version" (1), "variation" (int) and every field of
`mcqa.Question`: prompt (the user message text), options (list of 4 option texts, [] when
open-ended), answer (exact <answer> content: "[[B]]" or "[x, y, z]"), answer_letter ("B" or null),
question_type ("waypoint" | "current_state" | "movement"), answer_format ("mcqa" | "xyz"), task,
episode (e.g. "pick_up_cup/variation0/episode3"), frame, next_keyframe, description, camera,
state_xyz, next_xyz ([x, y, z] floats, metres), target_xyz ([x, y, z] or null), target_tokens
([i, j, k] or null). Decoding needs only this module; `read_records` reads a whole shard.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import struct
from typing import Iterator

from array_record.python.array_record_module import ArrayRecordReader
import numpy as np
from PIL import Image, UnidentifiedImageError

from robot_r1_jax.data.mcqa import Question

SCHEMA_VERSION = 1
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
