"""Training checkpoints (orbax) and preemption handling.

    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3)
    if (step := ckpt.latest_step()) is not None:
      state, meta = ckpt.restore(abstract_state=abstract, data_iterator=data_iter)
    with PreemptionGuard() as guard:
      for step in ...:
        ...
        if step % every == 0 or guard.sync_requested():
          ckpt.save(step, state, data_iterator=data_iter, meta={"flags": ..., "metrics": ...})
          if guard.requested: break
    ckpt.close()  # waits for the last asynchronous save

One checkpoint is one step directory `<directory>/<step>/` with three items:

    state/  the training state pytree (arrays, `nnx.State` or nested dicts), written by orbax's
            standard handler: each array from its own shards, so any mesh can save it and any other
            mesh can restore it (`restore` reshards onto `abstract_state`'s shardings).
    data/   the grain iterator state, one `process_<i>-of-<n>.json` per process (grain's orbax
            handler), present only when `save` was given a `data_iterator`.
    meta/   a JSON object (flags used, step metrics, ...).

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` only
after every item (and every process) finished, so a save interrupted by a crash, SIGKILL or a full
disk leaves at most a temporary directory. `latest_step`, `all_steps` and `restore` never see such a
step, and the next `Checkpointer` on the directory deletes the leftover. Keep-last-N deletes the
oldest steps only after the newer one is committed.

Asynchronous saves (`async_save=True`, the default): `save` blocks while arrays are copied off the
devices and the grain and meta items are written (so the iterator and `meta` may change right after
it returns), then the array files are written and the step committed by a background thread while
training continues. The next `save`, `wait` and `close` wait for it; an error in the background
write is raised from there. On CPU the device-to-host copy is a memory copy, so `save` returns
after roughly the time of copying the state once.

Multi-process (jax.distributed): every method except `latest_step`/`all_steps` is a collective.
Every process must construct the `Checkpointer` on the same (shared) directory and call `save`,
`restore`, `wait` and `close` with the same steps in the same order: orbax writes each process's
array shards and grain writes each process's iterator state, with barriers in between. Nothing
here is done on process 0 only. A SIGTERM may reach only some processes, so the training loop
decides to save on `PreemptionGuard.sync_requested()`, which agrees across processes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import types
from typing import Any, Callable, NamedTuple, Sequence

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from robot_r1_jax.train import processes

_STATE = "state"
_DATA = "data"
_META = "meta"


class CheckpointError(ValueError):
  """A checkpoint cannot be saved or restored as asked; the message names the directory and step."""


class Restored(NamedTuple):
  """What `Checkpointer.restore` returns; unpacks as `state, meta = ...`."""

  state: Any  # the pytree, with the structure and shardings of `abstract_state`
  meta: dict[str, Any]  # the JSON object given to `save` (empty if none was given)


class Checkpointer:
  """Saves and restores training state, grain iterator state and JSON metadata by step."""

  def __init__(self, directory: str | os.PathLike[str], *, max_to_keep: int | None = 3,
               async_save: bool = True):
    """Opens (creating it if needed) a checkpoint directory.

    Args:
      directory: local path or any path `etils.epath` understands (e.g. `gs://...`). Relative local
        paths are made absolute, because orbax requires absolute paths.
      max_to_keep: number of most recent steps kept; older ones are deleted after each save.
        None keeps every step.
      async_save: write array files in a background thread (see the module docstring).
    """
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
    path = os.fspath(directory)
    self.directory = epath.Path(path if "://" in path else os.path.abspath(path))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        # Deletes `*.orbax-checkpoint-tmp-*` leftovers of interrupted saves when opening.
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest step, or None if there is none.

    Counts complete steps on disk and a step this object is still saving asynchronously (it is
    committed before the next `save`, `restore`, `wait` or `close` returns); never a step whose
    save was interrupted.
    """
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every step, ascending, counted as in `latest_step`."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, *, data_iterator: Any = None,
           meta: dict[str, Any] | None = None, force: bool = False) -> bool:
    """Saves `state` (and optionally the iterator's position and `meta`) as `step`.

    Args:
      step: the training step; step directories are named by it.
      state: a pytree of `jax.Array`s (e.g. `{"params": nnx.state(model, nnx.Param),
        "opt": nnx.state(optimizer), "rng": key, "step": step_array}`); any sharding.
      data_iterator: a grain `DatasetIterator` or `DataLoader` iterator. Its `get_state()` is taken
        before `save` returns, so it may advance right after.
      meta: a JSON-serializable dict (non-finite floats allowed), copied before `save` returns.
      force: also save when `step` is not newer than the latest saved step (orbax's `force`).

    Returns:
      True if a checkpoint was started; False if `step` is already saved (e.g. a preemption save
      right after a periodic one) or, without `force`, older than the latest saved step.
    """
    step = int(step)  # a NumPy/JAX scalar would not match the integer step names
    if step in self._manager.all_steps():
      return False
    try:
      # A round trip copies `meta` (the caller may mutate it while the save is in flight) and
      # fails here, before anything is written, if it is not JSON.
      meta = json.loads(json.dumps({} if meta is None else meta))
    except (TypeError, ValueError) as e:
      raise CheckpointError(
          f"meta for step {step} in {self.directory} is not JSON-serializable: {e}") from e
    items = {_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved and jax.process_index() == 0:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int | None = None, *, abstract_state: Any,
              data_iterator: Any = None) -> Restored:
    """Restores a step onto the shardings of `abstract_state`.

    Args:
      step: the step to restore; None restores the latest complete step.
      abstract_state: the target pytree: the structure of the saved `state`, with leaves that are
        `jax.ShapeDtypeStruct`s carrying a `sharding` (or `jax.Array`s, whose shape, dtype and
        sharding are used). The mesh and shardings need not be the ones the step was saved from.
      data_iterator: a freshly built iterator of the same pipeline; its state is set in place to
        the saved position.

    Returns:
      `Restored(state, meta)`.

    Raises:
      CheckpointError: no complete step, an unknown step, an abstract leaf without a sharding, or a
        `data_iterator` for a step saved without one.
    """
    # A step still being written by this process is listed but not yet readable.
    self.wait()
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise CheckpointError(f"no complete checkpoint in {self.directory}")
      step = steps[-1]
    elif step not in steps:
      raise CheckpointError(
          f"step {step} is not a complete checkpoint in {self.directory}; available: {steps}")
    items = {_STATE: ocp.args.StandardRestore(_abstract(abstract_state)),
             _META: ocp.args.JsonRestore()}
    if data_iterator is not None:
      if not (self.directory / str(step) / _DATA).exists():
        raise CheckpointError(
            f"step {step} in {self.directory} was saved without a data iterator; restore it "
            "without data_iterator= or save with one")
      items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if jax.process_index() == 0:
      logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return Restored(state=restored[_STATE], meta=restored[_META])

  def restore_newest_good(self, *, abstract_state: Any,
                          data_iterator: Any = None) -> tuple[int, Restored] | None:
    """Restores the newest step that restores; None if there is no step.

    A damaged step (truncated or corrupt files, e.g. from a disk that filled after the commit) is
    skipped with a warning naming the step and the error, and once an older step restored, moved
    aside to `<directory>/damaged/<step>` (never deleted), so that training can save that step
    again. If no step restores, nothing is moved and the newest step's error is raised as a
    `CheckpointError`: a state that matches none of them (another model, say) is the caller's
    mistake, not damage.

    Multi-process: every process tries the same steps and all agree a step failed if it failed on
    any of them; process 0 moves the damaged steps.
    """
    failures: list[tuple[int, str]] = []
    for step in reversed(self.all_steps()):
      try:
        restored = self.restore(step, abstract_state=abstract_state, data_iterator=data_iterator)
        error = ""
      except Exception as e:  # orbax, tensorstore and json each raise their own kinds
        restored, error = None, f"{type(e).__name__}: {e}".splitlines()[0][:300]
      if processes.any_process(bool(error)):
        failures.append((step, error or "failed on another process"))
        logging.warning("checkpoint: step %d in %s does not restore (%s); trying an older one",
                        step, self.directory, failures[-1][1])
        continue
      if failures:
        self._move_damaged([s for s, _ in failures])
      return step, restored
    if failures:
      step, error = failures[0]
      raise CheckpointError(
          f"no checkpoint in {self.directory} restores: step {step} fails with {error}"
          + (f" (and {len(failures) - 1} older steps too)" if len(failures) > 1 else "")
          + "; does the run's model and optimizer match the one that saved them?")
    return None

  def _move_damaged(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      damaged = self.directory / "damaged"
      damaged.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target = damaged / str(step)
        suffix = 1
        while target.exists():  # the same step damaged twice keeps both copies
          target, suffix = damaged / f"{step}.{suffix}", suffix + 1
        (self.directory / str(step)).rename(target)
        logging.warning("checkpoint: moved damaged step %d to %s", step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("robot_r1_jax.checkpoint.move_damaged")
    self._manager.reload()

  def restore_part(self, step: int, *, abstract_part: Any) -> Any:
    """Restores only the subtrees of a step's state that `abstract_part` names (e.g.
    `{"params": ...}` of a `{"params", "opt_state"}` state), onto its shardings.

    Orbax ties an item to one handler per manager, so a Checkpointer that restores parts is one
    that neither saves nor restores whole states.
    """
    self.wait()
    if step not in self.all_steps():
      raise CheckpointError(
          f"step {step} is not a complete checkpoint in {self.directory}; available: "
          f"{self.all_steps()}")
    abstract = _abstract(abstract_part)
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract)
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args,
                                       partial_restore=True)}))
    return restored[_STATE]

  def meta(self, step: int) -> dict[str, Any]:
    """The JSON object saved with `step` (the run's flags under "config"), read alone."""
    self.wait()
    if step not in self.all_steps():
      raise CheckpointError(
          f"step {step} is not a complete checkpoint in {self.directory}; available: "
          f"{self.all_steps()}")
    return self._manager.restore(step, args=ocp.args.Composite(
        **{_META: ocp.args.JsonRestore()}))[_META]

  def wait(self) -> None:
    """Blocks until an in-flight asynchronous save is committed (re-raising its error)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for an in-flight save and releases orbax's threads."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def find_checkpoints(run_dir: str | os.PathLike[str]) -> epath.Path:
  """The checkpoints folder of a run: `run_dir/rl`, `run_dir`, `run_dir/sft` (an sft_rl run's
  stages, newest stage first) or `run_dir` as a checkpoints folder itself, whichever first holds a
  step."""
  run_dir = epath.Path(run_dir)
  candidates = [run_dir / "rl" / "checkpoints", run_dir / "checkpoints",
                run_dir / "sft" / "checkpoints", run_dir]
  for directory in candidates:
    if directory.is_dir():
      with Checkpointer(directory) as checkpoints:
        if checkpoints.latest_step() is not None:
          return directory
  raise CheckpointError(f"no checkpoint under {run_dir} (looked in "
                        f"{', '.join(str(c) for c in candidates)})")


def restore_params(model: nnx.Module, run_dir: str | os.PathLike[str],
                   step: int | None = None) -> int:
  """Loads the parameters of `step` (default: the newest) of the run into `model`; returns the
  step. The run's checkpoints are found as `find_checkpoints` does. Only the parameters are read:
  the optimizer state saved beside them stays on disk.
  """
  with Checkpointer(find_checkpoints(run_dir)) as checkpoints:
    step = checkpoints.latest_step() if step is None else step
    restored = checkpoints.restore_part(
        step, abstract_part={"params": nnx.state(model, nnx.Param)})
  nnx.update(model, restored["params"])
  return step


def _abstract(tree: Any) -> Any:
  """`tree` with every leaf a `jax.ShapeDtypeStruct` that has a sharding, or a CheckpointError."""

  def leaf(path, x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None:
      return x
    raise CheckpointError(
        f"abstract_state leaf {jax.tree_util.keystr(path)} is {x!r}; every leaf must be a "
        "jax.ShapeDtypeStruct with sharding= set (or a jax.Array), so restore knows where to "
        "put it")

  return jax.tree_util.tree_map_with_path(leaf, tree)


_Handler = Callable[[int, types.FrameType | None], Any] | int | None


class PreemptionGuard:
  """Turns termination signals into a flag that the training loop polls between steps.

  Inside `with PreemptionGuard() as guard:` a SIGTERM (what schedulers and TPU maintenance send
  before killing a job) no longer terminates the process: it sets `guard.requested`. The loop then
  saves a checkpoint and exits cleanly. Leaving the block restores the handlers that were installed
  before, so a SIGTERM after training behaves as it did before. Must be entered on the main thread
  (Python only delivers signals there).
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
    self._signals = tuple(signals)
    self._previous: dict[int, _Handler] = {}
    self._requested = False

  @property
  def requested(self) -> bool:
    """Whether one of the signals arrived at this process since the guard was entered."""
    return self._requested

  def sync_requested(self) -> bool:
    """`requested` on any process; a collective that every process must call at the same step.

    With one process this is `requested` and costs nothing.
    """
    return processes.any_process(self._requested)

  def __enter__(self) -> PreemptionGuard:
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("PreemptionGuard must be entered on the main thread (signal handlers "
                         "can only be installed there)")
    self._requested = False
    for signum in self._signals:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, previous in self._previous.items():
      # signal.signal returns None for handlers installed from C; SIG_DFL is the closest restore.
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous.clear()

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    del frame
    if not self._requested:
      logging.warning("received %s: stopping after the current step and saving a checkpoint",
                      signal.Signals(signum).name)
    self._requested = True
