"""RLBench's pickles, read without executing code and written without RLBench installed.

RLBench stores each episode's low-dimensional data as a pickled `rlbench.demo.Demo` of
`rlbench.backend.observation.Observation` objects. Unpickling runs whatever callables the stream
names, so reading untrusted demo folders with `pickle.load` is arbitrary code execution. Here every
global the stream names is looked up in a short allow-list (RLBench's two classes, mapped onto
stand-ins that only collect attributes, and numpy's array/scalar/dtype reconstruction); anything
else raises `UnsafePickleError` naming the global and the file before it is ever called. The real
`rlbench` package is never imported, even when it is installed.

Writing produces a stream that names RLBench's classes, so RLBench's own tools can load our demos.
Bytes depend only on the values written (same values, same bytes), which the simulator's
determinism test relies on.
"""

from __future__ import annotations

import codecs
import copyreg
import io
import pathlib
import pickle
from typing import Any

import numpy as np

from robot_r1_jax.data.demo import (Demo, DemoError, IMAGE_FIELDS, MissingFileError, Observation,
                                    OBSERVATION_FIELDS)

_PROTOCOL = 4  # Python >= 3.4 reads it, so any RLBench installation can load what we write.


class UnsafePickleError(DemoError):
  """A pickle names a global outside the allow-list; nothing it names was called."""


class _RLBenchObject:
  """Stand-in for an instance of an RLBench class: holds only its attribute dict.

  The same stand-ins serve both directions: the reader's allow-list maps RLBench's class names onto
  them, and the writer pickles them under RLBench's names.
  """

  rlbench_name: tuple[str, str]

  def __init__(self, state: dict[str, Any]):
    self.state = state

  def __setstate__(self, state: Any) -> None:
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
      raise DemoError(f"{'.'.join(self.rlbench_name)} state is {type(state).__name__}, expected "
                      "an attribute dict")
    self.state = state

  def __reduce_ex__(self, protocol: int):
    # copyreg.__newobj__ makes the pickler emit `cls` + NEWOBJ + BUILD(state): exactly what
    # pickling an ordinary RLBench instance produces.
    return copyreg.__newobj__, (type(self),), self.state


class _PickledDemo(_RLBenchObject):
  rlbench_name = ("rlbench.demo", "Demo")


class _PickledObservation(_RLBenchObject):
  rlbench_name = ("rlbench.backend.observation", "Observation")


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
  """Protocol 2 spells bytes as `_codecs.encode(text, 'latin1')`; only that use is allowed."""
  if encoding != "latin1" or not isinstance(text, str):
    raise DemoError(f"_codecs.encode with encoding {encoding!r} is not allowed in demo pickles")
  return codecs.encode(text, "latin1")


# numpy's reconstruction helpers moved from numpy.core to numpy._core in numpy 2; asking numpy for
# its own reducers finds them under either version without importing the deprecated numpy.core.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_SCALAR = np.float64(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]

_ALLOWED: dict[tuple[str, str], Any] = {
    _PickledDemo.rlbench_name: _PickledDemo,
    _PickledObservation.rlbench_name: _PickledObservation,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
for _package in ("numpy.core", "numpy._core"):
  _ALLOWED[(f"{_package}.multiarray", "_reconstruct")] = _RECONSTRUCT
  _ALLOWED[(f"{_package}.multiarray", "scalar")] = _SCALAR
  _ALLOWED[(f"{_package}.numeric", "_frombuffer")] = _FROMBUFFER

# What the writer names: RLBench's classes, and numpy's helpers under numpy 1.x's module names,
# which numpy 2 keeps importable for old pickles, so readers on either numpy major version can load.
_WRITE_NAMES: dict[Any, tuple[str, str]] = {
    _PickledDemo: _PickledDemo.rlbench_name,
    _PickledObservation: _PickledObservation.rlbench_name,
    _RECONSTRUCT: ("numpy.core.multiarray", "_reconstruct"),
    _SCALAR: ("numpy.core.multiarray", "scalar"),
}


class _SafeUnpickler(pickle.Unpickler):
  """Resolves globals only through `_ALLOWED`."""

  def __init__(self, file, path: pathlib.Path):
    super().__init__(file)
    self._path = path

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f"{self._path}: refused global {module}.{name} (demo pickles may only name RLBench's "
          "Demo/Observation and numpy arrays)") from None


def load_pickle(path: pathlib.Path) -> Any:
  """Unpickles `path` through the allow-list. Raises DemoError (or a subclass) naming the file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise MissingFileError(f"missing file {path}")
  with open(path, "rb") as f:
    try:
      return _SafeUnpickler(f, path).load()
    except UnsafePickleError:
      raise
    except Exception as e:  # Untrusted bytes can fail inside pickle or numpy in almost any way.
      raise DemoError(f"{path}: corrupt pickle ({type(e).__name__}: {e})") from e


def demo_from_pickle(obj: Any, path: pathlib.Path) -> Demo:
  """Converts an unpickled RLBench Demo stand-in into the project's `Demo`."""
  state = _state_of(obj, _PickledDemo, path, "the pickle")
  observations = state.pop("_observations", None)
  if not isinstance(observations, list):
    raise DemoError(f"{path}: Demo._observations is {type(observations).__name__}, expected a list")
  fields = set(OBSERVATION_FIELDS)
  converted = []
  for i, item in enumerate(observations):
    obs_state = _state_of(item, _PickledObservation, path, f"observation {i}")
    known = {k: v for k, v in obs_state.items() if k in fields}
    extra = {k: v for k, v in obs_state.items() if k not in fields}
    converted.append(Observation(**known, extra_fields=extra))
  random_seed = state.pop("random_seed", None)
  num_reset_attempts = state.pop("num_reset_attempts", None)
  return Demo(converted, random_seed=random_seed, num_reset_attempts=num_reset_attempts,
              extra_fields=state)


def describe(obj: Any) -> str:
  """What an unpickled object is, in RLBench's terms (its class name, not our stand-in's)."""
  if isinstance(obj, _RLBenchObject):
    return ".".join(obj.rlbench_name)
  if isinstance(obj, (list, tuple)) and obj:
    kinds = sorted({describe(item) for item in obj})
    return f"{type(obj).__name__} of {', '.join(kinds)}"
  return type(obj).__name__


def _state_of(obj: Any, cls: type[_RLBenchObject], path: pathlib.Path, what: str) -> dict:
  if not isinstance(obj, cls) or not hasattr(obj, "state"):
    raise DemoError(f"{path}: {what} is {describe(obj)}, expected {'.'.join(cls.rlbench_name)}")
  return dict(obj.state)


# ------------------------------------------------------------------------------------------------
# Writing.


class _RLBenchPickler(pickle._Pickler):  # pylint: disable=protected-access
  """Pickler that writes chosen objects under other importable names.

  The C pickler (`pickle.Pickler`) refuses to name a class it cannot import under that name, and
  `rlbench` is not importable here; the pure-Python pickler routes every global through
  `save_global`, which this class overrides.
  """

  def save_global(self, obj: Any, name: str | None = None) -> None:
    target = _WRITE_NAMES.get(obj)
    if target is None:
      super().save_global(obj, name)
      return
    assert self.proto >= 4, "STACK_GLOBAL needs protocol 4"
    self.save(target[0])
    self.save(target[1])
    self.write(pickle.STACK_GLOBAL)
    self.memoize(obj)


def dump_pickle(value: Any) -> bytes:
  """Pickles plain data (None, bool, int, float, str, bytes, list, tuple, dict, numeric numpy)."""
  return _dumps(_Canonicalizer().value(value, "value"))


def dump_demo(demo: Demo) -> bytes:
  """Pickles `demo` as RLBench does: an `rlbench.demo.Demo` whose image fields are None."""
  canon = _Canonicalizer()
  observations = []
  for i, obs in enumerate(demo.observations):
    if not isinstance(obs, Observation):
      raise DemoError(f"demo.observations[{i}] is {type(obs).__name__}, expected Observation")
    state = {}
    for name in OBSERVATION_FIELDS:
      # RLBench saves images as files and None's these fields before pickling; so do we.
      state[name] = None if name in IMAGE_FIELDS else canon.value(
          getattr(obs, name), f"observation {i} .{name}")
    _merge_extra(state, obs.extra_fields, canon, f"observation {i}")
    observations.append(_PickledObservation(state))
  state = {"_observations": observations,
           "random_seed": canon.value(demo.random_seed, "random_seed"),
           "num_reset_attempts": canon.value(demo.num_reset_attempts, "num_reset_attempts")}
  _merge_extra(state, demo.extra_fields, canon, "demo")
  return _dumps(_PickledDemo(state))


def _merge_extra(state: dict, extra: dict, canon: _Canonicalizer, where: str) -> None:
  for key, value in extra.items():
    if not isinstance(key, str) or key in state:
      raise DemoError(f"{where}: extra_fields key {key!r} must be a string that is not a standard "
                      "field")
    state[canon.value(key, where)] = canon.value(value, f"{where} .{key}")


def _dumps(obj: Any) -> bytes:
  buffer = io.BytesIO()
  _RLBenchPickler(buffer, protocol=_PROTOCOL).dump(obj)
  return buffer.getvalue()


class _Canonicalizer:
  """Copies values into a form whose pickle bytes depend only on the values.

  The pickler shares (memoizes) objects by identity, so two equal inputs built differently (one list
  referenced twice vs two equal lists) would give different bytes. Fresh containers and arrays are
  never shared; equal strings/bytes are always shared; dtypes are numpy's builtin singletons.
  Unsupported types are refused here, so everything written can be read back by the allow-list.
  """

  def __init__(self):
    self._atoms: dict[tuple[type, Any], Any] = {}

  def value(self, v: Any, where: str) -> Any:
    if v is None or isinstance(v, (bool, int, float)) and not isinstance(v, np.generic):
      return v
    if isinstance(v, (str, bytes)):
      return self._atoms.setdefault((type(v), v), v)
    if isinstance(v, np.ndarray) and v.dtype.kind in "biufc" and not v.dtype.fields:
      return np.array(v, dtype=np.dtype(v.dtype.char), order="C", copy=True)
    if isinstance(v, np.generic) and v.dtype.kind in "biufc":
      return np.dtype(v.dtype.char).type(v.item())
    if isinstance(v, list):
      return [self.value(x, f"{where}[{i}]") for i, x in enumerate(v)]
    if isinstance(v, tuple):
      return tuple(self.value(x, f"{where}[{i}]") for i, x in enumerate(v))
    if isinstance(v, dict):
      return {self.value(k, f"{where} key"): self.value(x, f"{where}[{k!r}]") for k, x in v.items()}
    raise DemoError(f"{where}: cannot write {type(v).__name__} values to an RLBench pickle "
                    "(allowed: None, bool, int, float, str, bytes, list, tuple, dict and numeric "
                    "numpy arrays/scalars)")
