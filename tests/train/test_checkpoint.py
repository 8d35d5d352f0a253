"""Checkpointer: NNX state across meshes, grain resume, keep-last-N, crash safety, SIGTERM."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from robot_r1_jax.train.checkpoint import CheckpointError, Checkpointer, PreemptionGuard

ROOT = Path(__file__).resolve().parents[2]


class _Toy(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.Linear(8, 16, rngs=rngs)
    self.down = nnx.Linear(16, 8, rngs=rngs)


def _train_state(seed: int = 0) -> dict:
  """params / optimizer state (after one AdamW update, so moments are non-zero) / rng / step.

  The rng is kept both as a typed key and as its raw uint32 data: the trainer may save either.
  """
  model = _Toy(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  optimizer.update(model, grads)
  return {"params": nnx.state(model, nnx.Param), "opt": nnx.state(optimizer),
          "rng": jax.random.key(seed), "rng_data": jax.random.key_data(jax.random.key(seed + 10)),
          "step": jnp.asarray(seed, jnp.int32)}


def _place(tree, mesh: Mesh, matrix_spec: P):
  """Matrices get `matrix_spec`, everything else is replicated."""
  def put(x):
    return jax.device_put(x, NamedSharding(mesh, matrix_spec if x.ndim == 2 else P()))
  return jax.tree.map(put, tree)


def _abstract(tree, mesh: Mesh, matrix_spec: P):
  def spec(x):
    sharding = NamedSharding(mesh, matrix_spec if x.ndim == 2 else P())
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(spec, tree)


def _assert_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _dataset() -> grain.IterDataset:
  return grain.MapDataset.range(1000).shuffle(seed=3).map(lambda i: i * 10).to_iter_dataset()


@pytest.mark.parametrize("target", ["1x8", "replicated"])
def test_restore_onto_a_different_mesh(tmp_path, mesh8, target):
  state = _place(_train_state(seed=1), mesh8, P("data", ("fsdp", "tensor")))
  up_kernel = state["params"]["up"]["kernel"][...]
  assert len(up_kernel.sharding.device_set) == 8 and not up_kernel.sharding.is_fully_replicated
  meta = {"flags": {"algo": "grpo"}, "metrics": {"loss": 0.5, "kl": float("nan")}}
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.save(7, state, meta=meta)

  if target == "1x8":
    mesh, spec = jax.make_mesh((1, 8), ("data", "fsdp")), P(None, "fsdp")
  else:
    mesh, spec = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), P()
  abstract = _abstract(_train_state(seed=2), mesh, spec)
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 7
    restored, restored_meta = ckpt.restore(abstract_state=abstract)

  _assert_equal(restored, state)
  assert isinstance(restored["params"], nnx.State) and isinstance(restored["opt"], nnx.State)
  for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
    assert leaf.sharding == want.sharding
  assert restored_meta["flags"] == {"algo": "grpo"} and restored_meta["metrics"]["loss"] == 0.5
  assert math.isnan(restored_meta["metrics"]["kl"])


def test_async_save_snapshots_state_iterator_and_meta(tmp_path):
  """What the caller owns may change as soon as `save` returns: the step holds the old values."""
  n = 1 << 20  # large enough that the background write is still running when `save` returns
  state = {"w": jnp.arange(n, dtype=jnp.float32)}
  donating_step = jax.jit(lambda s: {"w": s["w"] * 0 - 1}, donate_argnums=0)
  meta = {"metrics": {"loss": 1.0}}
  it = iter(_dataset())
  for _ in range(5):
    next(it)
  with Checkpointer(tmp_path, async_save=True) as ckpt:
    assert ckpt.save(3, state, data_iterator=it, meta=meta)
    expected_next = [next(it) for _ in range(4)]  # advanced while the save may still be writing
    meta["metrics"]["loss"] = 2.0
    state = donating_step(state)  # the next train step reuses the saved buffers
    # No `wait()`: restore must itself wait for the in-flight step.

    fresh = iter(_dataset())
    restored = ckpt.restore(3, abstract_state=state, data_iterator=fresh)
  assert [next(fresh) for _ in range(4)] == expected_next
  np.testing.assert_array_equal(restored.state["w"], np.arange(n, dtype=np.float32))
  assert restored.meta == {"metrics": {"loss": 1.0}}


def test_data_loader_iterator_resumes(tmp_path):
  loader = grain.DataLoader(data_source=grain.sources.RangeDataSource(0, 50, 1),
                            sampler=grain.samplers.IndexSampler(50, shuffle=True, seed=4,
                                                                num_epochs=1),
                            worker_count=0)
  it = iter(loader)
  for _ in range(7):
    next(it)
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, {"x": jnp.zeros(2)}, data_iterator=it)
    expected = [next(it) for _ in range(5)]
    fresh = iter(loader)
    ckpt.restore(1, abstract_state={"x": jnp.zeros(2)}, data_iterator=fresh)
  assert [next(fresh) for _ in range(5)] == expected


def test_keep_last_n_and_idempotent_saves(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    for step in (1, 2, 3, 4):
      assert ckpt.save(step, {"x": jnp.full(3, step)})
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
    # The trainer's preemption save may repeat a periodic save: not an error, nothing written.
    assert not ckpt.save(4, {"x": jnp.full(3, -1)})
    assert not ckpt.save(2, {"x": jnp.full(3, -1)})
    assert ckpt.all_steps() == [3, 4]
    restored = ckpt.restore(3, abstract_state={"x": jnp.zeros(3, jnp.int32)})
  np.testing.assert_array_equal(restored.state["x"], [3, 3, 3])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]


def _truncate_half(step_dir: Path) -> list[Path]:
  """Cuts every other file of a step to half its length (a disk that filled after the commit)."""
  files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size > 1)[::2]
  for path in files:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  return files


@pytest.mark.parametrize("damage", ["half_the_files", "meta"])
def test_a_damaged_newest_step_is_skipped_and_moved_aside(tmp_path, caplog, damage):
  iterator = iter(_dataset())
  with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
    for step in (1, 2, 3):
      next(iterator)
      ckpt.save(step, {"w": jnp.full(5, float(step))}, data_iterator=iterator, meta={"step": step})
    ckpt.wait()
  if damage == "meta":
    (tmp_path / "3" / "meta" / "metadata").write_text('{"step": ')
  else:
    assert _truncate_half(tmp_path / "3")
  damaged_files = sorted(p.relative_to(tmp_path / "3") for p in (tmp_path / "3").rglob("*"))

  fresh = iter(_dataset())
  with Checkpointer(tmp_path, max_to_keep=None) as ckpt, caplog.at_level("WARNING"):
    step, (state, meta) = ckpt.restore_newest_good(abstract_state={"w": jnp.zeros(5)},
                                                   data_iterator=fresh)
    assert step == 2 and meta == {"step": 2}
    np.testing.assert_array_equal(state["w"], np.full(5, 2.0))
    assert next(fresh) == list(_dataset())[2]  # the iterator continues after step 2's batch
    assert "step 3" in caplog.text and "does not restore" in caplog.text
    # Kept, out of the way: step 3 can be saved again.
    moved = tmp_path / "damaged" / "3"
    assert sorted(p.relative_to(moved) for p in moved.rglob("*")) == damaged_files
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.save(3, {"w": jnp.full(5, 30.0)})
    ckpt.wait()
    assert ckpt.restore_newest_good(abstract_state={"w": jnp.zeros(5)})[0] == 3


def test_no_step_restores_raises_and_moves_nothing(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.restore_newest_good(abstract_state={"w": jnp.zeros(5)}) is None
    for step in (1, 2):
      ckpt.save(step, {"w": jnp.zeros(5)})
    ckpt.wait()
    # A state of another shape (another model, not damage) fails on every step.
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* restores: step 2 .*and 1 older"):
      ckpt.restore_newest_good(abstract_state={"w": jnp.zeros(7)})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


_CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    import jax.numpy as jnp
    from robot_r1_jax.train.checkpoint import Checkpointer

    class DiesMidSave:
      # The grain handler asks for the iterator state between writing the array item and the
      # commit: dying there is a crash in the middle of saving step 2.
      def get_state(self):
        os._exit(17)

    # Keep only one step: step 1 must survive until step 2 is committed, which never happens.
    ckpt = Checkpointer(sys.argv[1], max_to_keep=1)
    ckpt.save(1, {"w": jnp.arange(4.0)}, meta={"step": 1})
    ckpt.wait()
    ckpt.save(2, {"w": jnp.arange(4.0) + 1000}, data_iterator=DiesMidSave(), meta={"step": 2})
    raise SystemExit("unreachable: the save of step 2 should have killed the process")
""")


def test_a_crash_during_save_keeps_the_last_good_checkpoint(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 17, proc.stderr[-3000:]
  leftovers = [p.name for p in tmp_path.iterdir() if p.name != "1"]
  assert leftovers and all(name.startswith("2.orbax-checkpoint-tmp") for name in leftovers), (
      f"the crash should leave only step 2's temporary directory, found {leftovers}")

  with Checkpointer(tmp_path, max_to_keep=1) as ckpt:
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    state, meta = ckpt.restore(abstract_state={"w": jnp.zeros(4)})
    np.testing.assert_array_equal(state["w"], np.arange(4.0))
    assert meta == {"step": 1}
    # Opening the directory cleared the debris, and step 2 can now be saved normally.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]
    assert ckpt.save(2, {"w": jnp.arange(4.0) + 1})
    ckpt.wait()
    assert ckpt.all_steps() == [2]


def test_errors_name_the_problem(tmp_path):
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    with pytest.raises(CheckpointError, match="no complete checkpoint in .*ckpt"):
      ckpt.restore(abstract_state={"x": jnp.zeros(2)})
    with pytest.raises(CheckpointError, match="not JSON-serializable"):
      ckpt.save(1, {"x": jnp.zeros(2)}, meta={"bad": object()})
    assert ckpt.all_steps() == []
    ckpt.save(1, {"x": jnp.zeros(2)})
    ckpt.wait()
    with pytest.raises(CheckpointError, match=r"step 5 .* available: \[1\]"):
      ckpt.restore(5, abstract_state={"x": jnp.zeros(2)})
    with pytest.raises(CheckpointError, match=r"\['x'\] .* sharding"):
      ckpt.restore(abstract_state={"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
    with pytest.raises(CheckpointError, match="saved without a data iterator"):
      ckpt.restore(abstract_state={"x": jnp.zeros(2)}, data_iterator=iter(_dataset()))


def test_preemption_guard_turns_sigterm_into_a_flag():
  received = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  try:
    with PreemptionGuard() as guard:
      assert not guard.requested and not guard.sync_requested()
      os.kill(os.getpid(), signal.SIGTERM)
      # The Python-level handler runs at the next bytecode boundary of the main thread.
      assert guard.requested and guard.sync_requested()
      assert received == [], "the guard must not forward the signal while active"
    # Leaving the guard restores the handler installed before it.
    os.kill(os.getpid(), signal.SIGTERM)
    assert received == [signal.SIGTERM]
    assert guard.requested, "the flag stays readable after the block"
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_preemption_guard_needs_the_main_thread():
  before = signal.getsignal(signal.SIGTERM)
  errors = []

  def enter():
    try:
      with PreemptionGuard():
        pass
    except RuntimeError as e:
      errors.append(str(e))

  thread = threading.Thread(target=enter)
  thread.start()
  thread.join()
  assert errors and "main thread" in errors[0]
  assert signal.getsignal(signal.SIGTERM) is before


_TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    process_id, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    import jax
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id)
    import grain
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from robot_r1_jax.train.checkpoint import Checkpointer, PreemptionGuard

    full = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    saved_sharding = NamedSharding(jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor")),
                                   P("data", ("fsdp", "tensor")))
    w = jax.make_array_from_callback(full.shape, saved_sharding, lambda index: full[index])
    dataset = grain.MapDataset.range(100)[process_id::2].to_iter_dataset()  # one shard each
    it = iter(dataset)
    for _ in range(2 + process_id):
      next(it)
    target = NamedSharding(jax.make_mesh((8,), ("x",)), P(None, "x"))
    with Checkpointer(directory) as ckpt:
      ckpt.save(5, {"w": w}, data_iterator=it, meta={"run": "two-process"})
      expected = [next(it) for _ in range(3)]
      fresh = iter(dataset)
      state, meta = ckpt.restore(
          abstract_state={"w": jax.ShapeDtypeStruct(full.shape, full.dtype, sharding=target)},
          data_iterator=fresh)
    assert [next(fresh) for _ in range(3)] == expected
    assert state["w"].sharding == target and meta == {"run": "two-process"}
    for shard in state["w"].addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])

    with PreemptionGuard() as guard:
      assert not guard.sync_requested()
      if process_id == 1:  # the scheduler preempts one host only
        os.kill(os.getpid(), signal.SIGTERM)
      assert guard.requested == (process_id == 1)
      assert guard.sync_requested(), "every process must agree to save and stop"
    print("OK")
""")


@pytest.mark.slow
def test_two_processes_save_restore_and_agree_on_preemption(tmp_path):
  """jax.distributed on localhost, 4 fake devices per process: one global state saved by both."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "PYTHONPATH": str(ROOT)}
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_SCRIPT, str(i), str(port),
                             str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=120)[0])
  finally:
    for proc in procs:  # a failure in one process leaves the other waiting at a barrier
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for i, (proc, output) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0 and output.rstrip().endswith("OK"), (
        f"process {i}:\n{output[-3000:]}")
  assert sorted(p.name for p in (tmp_path / "5" / "data").glob("*.json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
