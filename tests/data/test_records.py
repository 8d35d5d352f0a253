"""Record container: exact round trip, deterministic bytes, clear errors on foreign bytes."""

from __future__ import annotations

import json
import struct

from array_record.python.array_record_module import ArrayRecordWriter
import numpy as np
import pytest

from robot_r1_jax.data import mcqa, records
from robot_r1_jax.data.rlbench_io import encode_png

_CTX = mcqa.FrameContext(task="push_button", episode="push_button/variation0/episode1", frame=20,
                         next_keyframe=31, description="push the red button",
                         state_xyz=(0.1, -0.2, 0.9), next_xyz=(0.15, -0.25, 0.8))


def _record(question_type: str = "waypoint", answer_format: str = "mcqa") -> records.Record:
  question = mcqa.build_question(question_type, _CTX, seed=0,
                                 config=mcqa.McqaConfig(answer_format=answer_format))
  image = np.random.default_rng(0).integers(0, 256, (8, 6, 3), dtype=np.uint8)
  return records.Record(question=question, variation=3, image_png=encode_png(image))


@pytest.mark.parametrize("question_type, answer_format", [
    ("waypoint", "mcqa"), ("current_state", "mcqa"), ("movement", "mcqa"), ("waypoint", "xyz")])
def test_round_trip(question_type, answer_format):
  record = _record(question_type, answer_format)
  data = records.encode_record(record)
  assert data == records.encode_record(_record(question_type, answer_format))  # Deterministic.
  decoded = records.decode_record(data)
  assert decoded == record
  np.testing.assert_array_equal(decoded.image(), np.random.default_rng(0).integers(
      0, 256, (8, 6, 3), dtype=np.uint8))
  header = json.loads(data[8:8 + struct.unpack_from("<I", data, 4)[0]])
  assert header["schema_version"] == 1 and header["variation"] == 3
  assert header["prompt"] == record.question.prompt


def test_read_records_from_a_shard(tmp_path):
  shard = tmp_path / "train-00000.array_record"
  writer = ArrayRecordWriter(str(shard), records.WRITER_OPTIONS)
  originals = [_record(t) for t in mcqa.QUESTION_TYPES] * 30
  for record in originals:
    writer.write(records.encode_record(record))
  writer.close()
  assert list(records.read_records(shard)) == originals
  with pytest.raises(FileNotFoundError, match="does not exist"):
    next(records.read_records(tmp_path / "missing.array_record"))


def test_foreign_bytes_are_rejected():
  good = records.encode_record(_record())
  length = struct.unpack_from("<I", good, 4)[0]
  header = json.loads(good[8:8 + length])
  cases = [
      (b"RR1", "shorter than its header"),
      (b"PK\x03\x04" + good[4:], "expected b'RR1Q'"),
      (good[:4] + struct.pack("<I", len(good)) + good[8:], "claims"),
      (good[:8] + b"[" + good[9:], "not a question"),
  ]
  newer = json.dumps(dict(header, schema_version=2), sort_keys=True).encode()
  cases.append((b"RR1Q" + struct.pack("<I", len(newer)) + newer, "schema_version=2"))
  extra = json.dumps(dict(header, surprise=1), sort_keys=True).encode()
  cases.append((b"RR1Q" + struct.pack("<I", len(extra)) + extra, "unknown .'surprise'"))
  for data, message in cases:
    with pytest.raises(records.RecordError, match=message):
      records.decode_record(data)
  with pytest.raises(records.RecordError, match="unreadable PNG"):
    records.Record(_record().question, 0, b"not png").image()
