"""MetricsWriter (TensorBoard events + JSONL, resume truncation), ProgressBar and StepTimer."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from robot_r1_jax.train.metrics import MetricsWriter, ProgressBar, StepTimer


def _events(tb_dir: Path) -> list[event_pb2.Event]:
  """Every event in the directory's event files, in file-name (creation) order.

  TFRecord framing: uint64 length, uint32 CRC of the length, the bytes, uint32 CRC of the bytes.
  """
  files = sorted(tb_dir.glob("events.out.tfevents.*"))
  assert files, f"no event file in {tb_dir}"
  events = []
  for path in files:
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack_from("<Q", data, offset)
      offset += 12
      events.append(event_pb2.Event.FromString(data[offset:offset + length]))
      offset += length + 4
    assert offset == len(data), f"{path} ends with a torn record"
  return events


def _scalar_events(tb_dir: Path) -> list[tuple[int, str, float]]:
  return [(e.step, v.tag, v.simple_value) for e in _events(tb_dir) for v in e.summary.value]


def _lines(path: Path) -> list[dict]:
  # Strict JSON: a bare NaN/Infinity token would make this raise.
  def reject(token):
    raise AssertionError(f"{path} holds the non-JSON token {token}")
  return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def test_scalars_go_to_tensorboard_and_jsonl(tmp_path):
  with MetricsWriter(tmp_path, enabled=True) as writer:
    for step in (1, 2, 3):
      writer.scalars(step, {"loss": 0.5 * step, "reward/format": np.float32(0.25),
                            "kl": jnp.asarray([1e-3 * step]), "tokens": np.int64(100 * step)})
  lines = _lines(tmp_path / "metrics.jsonl")
  assert lines[1] == {"step": 2, "loss": 1.0, "reward/format": 0.25,
                      "kl": pytest.approx(2e-3), "tokens": 200}
  assert [line["step"] for line in lines] == [1, 2, 3]
  scalars = _scalar_events(tmp_path / "tb")
  assert len(scalars) == 12
  assert (3, "loss", 1.5) in scalars and (2, "tokens", 200.0) in scalars
  assert (1, "kl", pytest.approx(1e-3)) in scalars


def test_non_finite_values_become_strings(tmp_path):
  with MetricsWriter(tmp_path, enabled=True) as writer:
    writer.scalars(1, {"loss": float("nan"), "ratio/max": np.inf, "adv/min": -np.inf, "ok": 1.0})
    writer.rollouts(1, [{"prompt_id": "p0", "reward": float("nan"),
                         "logp": np.array([0.5, -np.inf], np.float32)}])
  assert _lines(tmp_path / "metrics.jsonl") == [
      {"step": 1, "loss": "nan", "ratio/max": "inf", "adv/min": "-inf", "ok": 1.0}]
  assert _lines(tmp_path / "rollouts.jsonl") == [
      {"step": 1, "prompt_id": "p0", "reward": "nan", "logp": [0.5, "-inf"]}]
  values = {tag: value for _, tag, value in _scalar_events(tmp_path / "tb")}
  assert math.isnan(values["loss"]) and values["ratio/max"] == math.inf and values["ok"] == 1.0


def test_rollouts_jsonl(tmp_path):
  records = [{"prompt_id": f"p{i}", "question_type": "waypoint", "completion": "<think>…</think>",
              "reward": {"format": 1.0, "answer": float(i % 2)}, "answer": "[[B]]"}
             for i in range(3)]
  with MetricsWriter(tmp_path, enabled=True) as writer:
    writer.rollouts(4, records)
    writer.rollouts(8, records[:1])
  lines = _lines(tmp_path / "rollouts.jsonl")
  assert [line["step"] for line in lines] == [4, 4, 4, 8]
  assert lines[1] == {"step": 4, **records[1]}


def test_rollouts_viewer_files(tmp_path):
  with MetricsWriter(tmp_path, enabled=True) as writer:
    writer.rollouts(2, [{"completion": "</script><b>", "reward": float("inf")}])
  assert (tmp_path / "rollouts.html").read_text().count('<script src="rollouts.js">') == 1
  # One JavaScript statement per record, the record as JSON (no NaN/inf literals).
  assert (tmp_path / "rollouts.js").read_text() == (
      'rollout({"step": 2, "completion": "</script><b>", "reward": "inf"});\n')


def test_resume_truncates_and_appends(tmp_path):
  with MetricsWriter(tmp_path, enabled=True) as first:
    for step in range(1, 6):
      first.scalars(step, {"loss": float(step)})
      first.rollouts(step, [{"prompt_id": "p", "reward": 0.0}])
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "lo')  # torn by a SIGKILL in the middle of a write

  with MetricsWriter(tmp_path, enabled=True) as resumed:  # restored the checkpoint of step 3
    resumed.truncate_after(3)
    assert [line["step"] for line in _lines(tmp_path / "rollouts.jsonl")] == [1, 2, 3]
    script = (tmp_path / "rollouts.js").read_text().splitlines()
    assert script == [f'rollout({{"step": {s}, "prompt_id": "p", "reward": 0.0}});' for s in (1, 2, 3)]
    for step in (4, 5):
      resumed.scalars(step, {"loss": 10.0 * step})

  assert _lines(tmp_path / "metrics.jsonl") == [
      {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.0},
      {"step": 4, "loss": 40.0}, {"step": 5, "loss": 50.0}]
  # Both runs' event files survive (the resume may well start within the same second), in order;
  # the resumed one starts with a "restart at step 4" marker that makes TensorBoard drop the
  # first run's events from step 4 on.
  events = _events(tmp_path / "tb")
  starts = [i for i, e in enumerate(events)
            if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START]
  assert [events[i].step for i in starts] == [4]
  before = [(e.step, v.simple_value) for e in events[:starts[0]] for v in e.summary.value]
  after = [(e.step, v.simple_value) for e in events[starts[0]:] for v in e.summary.value]
  assert before == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0)]
  assert after == [(4, 40.0), (5, 50.0)]


def test_truncate_refuses_a_corrupt_middle_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a JSON object"):
    MetricsWriter(tmp_path, enabled=True).truncate_after(1)
  assert path.read_text() == '{"step": 1}\nnot json\n{"step": 2}\n', "nothing may be lost"


def test_flush_every(tmp_path):
  with MetricsWriter(tmp_path, enabled=True, flush_every=3) as writer:
    writer.scalars(1, {"a": 1.0})
    writer.scalars(2, {"a": 2.0})
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    writer.scalars(3, {"a": 3.0})
    assert len(_lines(tmp_path / "metrics.jsonl")) == 3
    writer.scalars(4, {"a": 4.0})
    writer.flush()  # what the trainer does after each checkpoint save
    assert len(_lines(tmp_path / "metrics.jsonl")) == 4


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with MetricsWriter(workdir, enabled=False) as writer:
    writer.scalars(1, {"loss": 1.0})
    writer.rollouts(1, [{"prompt_id": "p"}])
    writer.truncate_after(0)
  assert not workdir.exists()


def test_bad_values_name_the_key(tmp_path):
  with MetricsWriter(tmp_path, enabled=True) as writer:
    with pytest.raises(ValueError, match="metric 'hist' must be a single number"):
      writer.scalars(1, {"hist": np.zeros(3)})
    with pytest.raises(ValueError, match="metric 'name' must be a single number"):
      writer.scalars(1, {"name": "grpo"})
    with pytest.raises(ValueError, match=r"rollout 0\['meta'\]\['obj'\] is a object"):
      writer.rollouts(1, [{"meta": {"obj": object()}}])
    with pytest.raises(ValueError, match="own 'step' key"):
      writer.rollouts(1, [{"step": 3}])


def test_progress_bar_shows_metrics_on_stderr(capsys):
  with ProgressBar(10, initial=2, enabled=True, plain=False) as bar:
    bar.update(3, {"reward": 0.5, "acc": np.float32(0.25), "kl": jnp.asarray(1.2345678e-3)})
  captured = capsys.readouterr()
  assert captured.out == ""
  assert "3/10" in captured.err
  assert "reward=0.5" in captured.err and "acc=0.25" in captured.err
  assert "kl=0.001235" in captured.err


def test_plain_progress_is_a_few_whole_lines_without_carriage_returns(capsys):
  with ProgressBar(40, initial=3, enabled=True, plain=True, desc="rl") as bar:
    for step in range(4, 38):  # stops early: the last line says where
      bar.update(step, {"reward": step / 100})
  err = capsys.readouterr().err
  assert "\r" not in err
  lines = err.splitlines()
  steps = [int(line.split()[1].split("/")[0]) for line in lines]
  assert steps == [4, 8, 12, 16, 20, 24, 28, 32, 36, 37]  # first, every 4th (a tenth), last
  assert lines[0].startswith("rl 4/40 [0:00, ") and " left] reward=0.04" in lines[0]
  assert lines[-1].endswith("reward=0.37")


def test_disabled_progress_bar_is_silent(capsys):
  with ProgressBar(10, enabled=False) as bar:
    bar.update(5, {"reward": 0.5})
  assert capsys.readouterr() == ("", "")


def test_step_timer():
  now = [0.0]
  timer = StepTimer(clock=lambda: now[0])
  with timer("rollout"):
    now[0] += 2.0
  with timer("update"):
    now[0] += 0.5
  with timer("rollout"):  # a second block with the same label adds up
    now[0] += 1.0
  assert timer.summary() == {"time/rollout": 3.0, "time/update": 0.5}
  assert timer.per_second(600, "rollout") == 200.0
  assert timer.per_second(700) == 200.0
  with pytest.raises(KeyError, match="reward"):
    timer.per_second(1, "reward")
  with pytest.raises(RuntimeError):
    with timer("update"):  # time spent in a failing phase still counts
      now[0] += 1.5
      raise RuntimeError
  assert timer.summary()["time/update"] == 2.0
  timer.reset()
  assert timer.summary() == {}


def test_remote_workdir_uploads_and_resumes(gcs_bucket):
  from etils import epath
  workdir = epath.Path(gcs_bucket) / "metrics_run"
  with MetricsWriter(workdir, enabled=True) as first:
    for step in range(1, 6):
      first.scalars(step, {"loss": float(step)})
      first.rollouts(step, [{"prompt_id": "p"}])
    first.write_bytes("rollout_records/3.png", b"png")
  assert (workdir / "rollouts.html").exists() and (workdir / "rollout_records/3.png").exists()
  assert list((workdir / "tb").iterdir())
  with MetricsWriter(workdir, enabled=True) as resumed:  # another process: nothing local
    resumed.truncate_after(3)
    resumed.scalars(4, {"loss": 40.0})
    assert resumed.exists("rollout_records/3.png") and not resumed.exists("rollout_records/4.png")
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.0},
                  {"step": 4, "loss": 40.0}]
  assert [json.loads(line)["step"] for line in
          (workdir / "rollouts.jsonl").read_text().splitlines()] == [1, 2, 3]

