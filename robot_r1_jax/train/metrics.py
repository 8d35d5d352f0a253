"""Training metrics: TensorBoard events + JSONL files, a console progress bar and phase timers.

    writer = MetricsWriter(workdir)            # writes on process 0 only
    writer.truncate_after(resumed_step)        # after a restore (or 0 on a fresh start)
    bar = ProgressBar(total_steps, initial=resumed_step)
    timer = StepTimer()
    for step in range(resumed_step + 1, total_steps + 1):
      timer.reset()
      with timer("rollout"):
        ...  # block on the results inside the block (jax dispatches asynchronously)
      metrics = {**train_metrics, **timer.summary(),
                 "tokens_per_second": timer.per_second(num_tokens, "rollout")}
      writer.scalars(step, metrics)
      writer.rollouts(step, [{"prompt_id": ..., "question_type": ..., "completion": ...,
                              "reward": ...}])  # every K steps
      bar.update(step, {"reward": ..., "acc": ..., "kl": ...})
    writer.close(); bar.close()

Files under `workdir`:

    tb/               TensorBoard event files (`tensorboard --logdir workdir/tb`).
    metrics.jsonl     one JSON object per `scalars` call: {"step": 3, "loss": 0.25, ...}.
    rollouts.jsonl    one JSON object per sampled rollout: {"step": 3, "prompt_id": ..., ...}.
    rollouts.js       the same objects, each as a line `rollout({...});`, for rollouts.html:
    rollouts.html     the viewer (open it in a browser; reload to see new steps): per step the
                      image, the question, the G completions with rewards and advantages.

JSON has no NaN or infinity, so non-finite floats are written as the strings "nan", "inf" and "-inf"
(`float(...)` reads them back). The JSONL files and rollouts.js are append-only; a resumed run first calls
`truncate_after(step)` so that lines written after the restored checkpoint (which the resumed run
writes again) do not appear twice, and TensorBoard is told to hide its events after that step too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
import tensorboardX
import tqdm
from etils import epath

from robot_r1_jax.data.atomic import is_remote

METRICS_FILE = "metrics.jsonl"
ROLLOUTS_FILE = "rollouts.jsonl"
ROLLOUTS_JS = "rollouts.js"  # the same records as rollouts.jsonl, as the viewer's script
ROLLOUTS_HTML = "rollouts.html"
TENSORBOARD_DIR = "tb"
# How each file wraps one JSON object per line: a browser runs a local script from a file:// page,
# but refuses to fetch a local JSON file, so the viewer's data is JavaScript.
_LINE = {METRICS_FILE: ("", ""), ROLLOUTS_FILE: ("", ""), ROLLOUTS_JS: ("rollout(", ");")}
_VIEWER = Path(__file__).with_name(ROLLOUTS_HTML)


class MetricsWriter:
  """Writes per-step scalars to TensorBoard and `metrics.jsonl`, and rollouts to `rollouts.jsonl`.

  Flushes files every `flush_every` calls to `scalars` and on `flush`/`close`. Killing the process
  loses at most the unflushed calls, so call `flush()` whenever a checkpoint is saved: then every
  step up to the checkpoint is on disk when a resumed run truncates after it.
  """

  def __init__(self, workdir: str | os.PathLike[str], *, enabled: bool | None = None,
               flush_every: int = 1):
    """Prepares `workdir` (created if absent) for metric files.

    Args:
      workdir: the run's directory.
      enabled: write anything at all; None means on process 0 only (every process may call every
        method, the others do nothing).
      flush_every: flush after this many `scalars` calls.
    """
    if flush_every < 1:
      raise ValueError(f"flush_every must be >= 1, got {flush_every}")
    self.workdir = epath.Path(workdir)
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._flush_every = flush_every
    self._unflushed = 0
    self._files: dict[str, IO[str]] = {}
    self._tb: tensorboardX.SummaryWriter | None = None
    self._purge_step: int | None = None
    # An object store cannot append: files are written in a local mirror and uploaded whole by
    # `flush` (the appended ones fetched first, so a resumed run continues them).
    self._remote = is_remote(workdir)
    self._mirror: Path | None = None  # made on first use, removed by `close`
    self._fetched: set[str] = set()
    self._dirty: set[str] = set()
    if self.enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    """Writes one step's scalars (Python, NumPy or single-element JAX numbers).

    Raises:
      ValueError: a value is not a single number; the message names its key.
    """
    if not self.enabled:
      return
    step = int(step)
    numbers = {str(name): _scalar(name, value) for name, value in values.items()}
    tb = self._tensorboard()
    for name, value in numbers.items():
      tb.add_scalar(name, value, global_step=step)
    self._append(METRICS_FILE, {"step": step, **_jsonable("metrics", numbers)})
    self._unflushed += 1
    if self._unflushed >= self._flush_every:
      self.flush()

  def rollouts(self, step: int, records: Sequence[Mapping[str, Any]]) -> None:
    """Appends one JSON line per rollout (e.g. prompt id, question type, completion, reward).

    Values may be nested dicts/lists of JSON types, NumPy or JAX values (arrays become lists).

    Raises:
      ValueError: a record has its own "step" key or a value that has no JSON form.
    """
    if not self.enabled:
      return
    step = int(step)
    if not self.exists(ROLLOUTS_HTML):
      self.write_bytes(ROLLOUTS_HTML, _VIEWER.read_bytes())
    for i, record in enumerate(records):
      if "step" in record:
        raise ValueError(f"rollout {i} of step {step} has its own 'step' key; the writer adds it")
      line = {"step": step, **_jsonable(f"rollout {i}", dict(record))}
      self._append(ROLLOUTS_FILE, line)
      self._append(ROLLOUTS_JS, line)

  def truncate_after(self, step: int) -> None:
    """Drops lines with a step after `step` from the JSONL files and rollouts.js, and hides later
    TensorBoard events.

    A line torn by a kill in the middle of a write (only possible as the last line) is dropped too.

    Raises:
      ValueError: a line before the last one is not a JSON object with a "step"; names the file.
    """
    if not self.enabled:
      return
    self.close()
    # TensorBoard hides the older files' events at steps >= purge_step when it reads the next file.
    self._purge_step = step + 1
    for name, (head, tail) in _LINE.items():
      path = self._fetch(name)
      if not path.exists():
        continue
      lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
      kept = []
      for number, line in enumerate(lines, start=1):
        try:
          text = line.rstrip("\n")
          if not (text.startswith(head) and text.endswith(tail)):
            raise ValueError(f"not wrapped in {head!r}…{tail!r}")
          line_step = json.loads(text[len(head):len(text) - len(tail)])["step"]
        except (ValueError, TypeError, KeyError) as e:
          if number == len(lines):
            break
          raise ValueError(f"{path}:{number} is not a JSON object with a 'step': {e}") from e
        if line_step <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
      tmp = path.with_name(path.name + ".tmp")
      tmp.write_text("".join(kept), encoding="utf-8")
      os.replace(tmp, path)  # atomic: a kill here leaves the old or the new file, never half
      self._dirty.add(name)
    self.flush()

  def append_text(self, name: str, line: str) -> None:
    """Appends `line` and a newline to the file `name` (relative to the workdir)."""
    if self.enabled:
      self._open(name).write(line + "\n")

  def write_bytes(self, name: str, data: bytes) -> None:
    """Writes the file `name` (relative to the workdir, folders made) whole: the old content or
    the new, never half."""
    if not self.enabled:
      return
    path = self._local() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    self._dirty.add(name)

  def read_text(self, name: str) -> str:
    """What the file `name` (relative to the workdir) holds now ("" if there is none)."""
    if name in self._files:
      self._files[name].flush()
    path = self._fetch(name)
    return path.read_text(encoding="utf-8") if path.exists() else ""

  def exists(self, name: str) -> bool:
    """Whether the file `name` (relative to the workdir) was written, by this writer or before."""
    return (self._local() / name).exists() or (self._remote and (self.workdir / name).exists())

  def flush(self) -> None:
    """Pushes buffered lines and events to the files (and a remote workdir's changed files to
    the object store)."""
    for f in self._files.values():
      f.flush()
    if self._tb is not None:
      self._tb.flush()
    self._unflushed = 0
    if self._remote:
      events = self._local() / TENSORBOARD_DIR
      names = self._dirty | {str(p.relative_to(self._local())) for p in events.glob("*")
                             if p.is_file()}
      for name in sorted(names):
        target = self.workdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((self._local() / name).read_bytes())
    self._dirty.clear()

  def close(self) -> None:
    """Flushes and closes the files; later writes reopen them in append mode."""
    self.flush()
    for f in self._files.values():
      f.close()
    self._files.clear()
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._mirror is not None:
      self.flush()  # the events the TensorBoard writer wrote as it closed
      shutil.rmtree(self._mirror, ignore_errors=True)
      self._mirror, self._fetched = None, set()

  def _local(self) -> Path:
    """Where files are written: the workdir, or for a remote one a local mirror of it."""
    if not self._remote:
      return Path(self.workdir)
    if self._mirror is None:
      self._mirror = Path(tempfile.mkdtemp(prefix="metrics-"))
    return self._mirror

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _tensorboard(self) -> tensorboardX.SummaryWriter:
    if self._tb is None:
      # tensorboardX names files by the second and opens them with "wb": without a unique suffix
      # a writer opened in the same second as the last one (a quick resume) would erase its file.
      # Nanoseconds keep the names unique and sorted by creation, the order TensorBoard reads in.
      # flush_secs is a backstop; `flush` controls when events reach the disk.
      self._tb = tensorboardX.SummaryWriter(
          str(self._local() / TENSORBOARD_DIR), purge_step=self._purge_step, flush_secs=30,
          filename_suffix=f".{time.time_ns()}")
      self._purge_step = None
    return self._tb

  def _append(self, name: str, record: dict[str, Any]) -> None:
    # allow_nan=False: `_jsonable` already turned non-finite floats into strings.
    head, tail = _LINE[name]
    self._open(name).write(head + json.dumps(record, allow_nan=False) + tail + "\n")

  def _open(self, name: str) -> IO[str]:
    if name not in self._files:
      # Kept open between calls; `close` closes it.
      self._files[name] = open(  # pylint: disable=consider-using-with
          self._fetch(name), "a", encoding="utf-8")
    self._dirty.add(name)
    return self._files[name]

  def _fetch(self, name: str) -> Path:
    """The local file of `name`; from a remote workdir, a copy of what is there (once)."""
    path = self._local() / name
    if self._remote and name not in self._fetched:
      self._fetched.add(name)
      remote = self.workdir / name
      if remote.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(remote.read_bytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    return path



def _scalar(name: str, value: Any) -> float | int:
  """A JSON- and TensorBoard-ready number from a Python/NumPy/JAX scalar or 1-element array."""
  array = np.asarray(value)
  if array.size != 1 or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
    raise ValueError(f"metric {name!r} must be a single number, got {type(value).__name__} "
                     f"of shape {array.shape} and dtype {array.dtype}")
  item = array.reshape(()).item()
  return int(item) if isinstance(item, (bool, int)) else float(item)


def _jsonable(where: str, value: Any) -> Any:
  """`value` as JSON types, non-finite floats as "nan"/"inf"/"-inf"; `where` names it in errors."""
  if value is None or isinstance(value, (str, bool, int)):
    return value
  if isinstance(value, float):
    return value if math.isfinite(value) else str(value)
  if isinstance(value, Mapping):
    return {str(k): _jsonable(f"{where}[{k!r}]", v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(f"{where}[{i}]", v) for i, v in enumerate(value)]
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return _jsonable(where, np.asarray(value).tolist())
  raise ValueError(f"{where} is a {type(value).__name__}, which has no JSON form")


class ProgressBar:
  """Progress on stderr: steps done, rate, ETA and the latest key metrics.

  On a terminal, a tqdm bar. Otherwise (a log file, a pipe, a scheduler's capture) one plain line
  now and then: at the first update, every tenth of the run, at least once a minute and at the
  end; tqdm's carriage-return redraws would pile up there as one unreadable line.
  """

  def __init__(self, total_steps: int | None, initial: int = 0, enabled: bool | None = None,
               desc: str = "train", plain: bool | None = None, min_seconds: float = 60.0):
    """`enabled`: None means on process 0 only; a disabled bar prints nothing. `plain`: None
    means when stderr is not a terminal."""
    enabled = jax.process_index() == 0 if enabled is None else enabled
    self._plain = enabled and (not sys.stderr.isatty() if plain is None else plain)
    self._bar = tqdm.tqdm(total=total_steps, initial=initial, disable=not enabled or self._plain,
                          file=sys.stderr, desc=desc, unit="step", dynamic_ncols=True)
    self._desc, self._total, self._initial = desc, total_steps, initial
    self._every = max(1, (total_steps or 0) // 10)
    self._min_seconds = min_seconds
    self._start = self._last_line = time.monotonic()
    self._step, self._printed_step, self._postfix = initial, initial, ""

  def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
    """Moves the bar to `step` (steps done) and shows `metrics` with 4 significant digits."""
    postfix = {k: f"{_scalar(k, v):.4g}" for k, v in (metrics or {}).items()}
    if not self._plain:
      if postfix:
        self._bar.set_postfix(postfix, refresh=False)
      self._bar.update(step - self._bar.n)
      return
    if postfix:
      self._postfix = " ".join(f"{k}={v}" for k, v in postfix.items())
    self._step = step
    if (self._printed_step == self._initial or step % self._every == 0 or step == self._total
        or time.monotonic() - self._last_line >= self._min_seconds):
      self._print_line()

  def _print_line(self) -> None:
    elapsed = time.monotonic() - self._start
    done = self._step - self._initial
    line = f"{self._desc} {self._step}" + (f"/{self._total}" if self._total else "")
    if done > 0:
      line += f" [{_duration(elapsed)}, {elapsed / done:.3g} s/step"
      if self._total:
        line += f", {_duration(elapsed / done * (self._total - self._step))} left"
      line += "]"
    print(line + (f" {self._postfix}" if self._postfix else ""), file=sys.stderr, flush=True)
    self._printed_step, self._last_line = self._step, time.monotonic()

  def close(self) -> None:
    if self._plain and self._step != self._printed_step:
      self._print_line()  # where it stopped (data exhausted, SIGTERM)
    self._bar.close()

  def __enter__(self) -> ProgressBar:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _duration(seconds: float) -> str:
  """`83.2` → `1:23`; `4000` → `1:06:40`."""
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class StepTimer:
  """Wall-clock seconds per labelled phase, accumulated until `reset`.

  JAX dispatches asynchronously: a phase that launches device work must wait for its results
  (`jax.block_until_ready`, or a host transfer) inside the block, or its time lands in a later
  phase.
  """

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    """`clock`: seconds from an arbitrary origin (tests pass a fake one)."""
    self._clock = clock
    self._seconds: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, label: str) -> Iterator[None]:
    """Times the block under `label` (repeated blocks with one label add up)."""
    start = self._clock()
    try:
      yield
    finally:
      self._seconds[label] = self._seconds.get(label, 0.0) + self._clock() - start

  def summary(self) -> dict[str, float]:
    """{"time/<label>": seconds} for every phase timed since the last `reset`."""
    return {f"time/{label}": seconds for label, seconds in self._seconds.items()}

  def per_second(self, count: float, *labels: str) -> float:
    """`count` (e.g. generated tokens) divided by the seconds of `labels` (all phases if none)."""
    unknown = [label for label in labels if label not in self._seconds]
    if unknown:
      raise KeyError(f"phases {unknown} were not timed; timed: {sorted(self._seconds)}")
    seconds = sum(self._seconds[label] for label in labels or self._seconds)
    if seconds <= 0:
      raise ValueError(f"no time recorded for phases {list(labels or self._seconds)}")
    return count / seconds

  def reset(self) -> None:
    self._seconds.clear()
