"""Declarative Hugging Face ↔ robot_r1_jax parameter name table.

A `Rule` pairs one Hugging Face tensor name (relative to its component prefix, `{i}` standing for the
layer index) with the path of our parameter and the two array transforms between them. Layers are
stacked in our modules (leading L axis, scanned), so a rule with `{i}` fills slice i of our parameter.
Component modules publish their rules (`text.hf_rules`, `vision.hf_rules`); `hf_io` walks them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Transform = Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
  return x


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str  # e.g. "layers.{i}.self_attn.q_proj.weight"
  ours: tuple[str, ...]  # e.g. ("layers", "attn", "q", "kernel")
  to_ours: Transform = _identity  # one HF tensor → our layout (one layer's slice when stacked)
  to_hf: Transform = _identity  # the inverse

  @property
  def stacked(self) -> bool:
    return "{i}" in self.hf


def dense(hf_name: str, ours: tuple[str, ...], in_shape: Sequence[int],
          out_shape: Sequence[int], hf_shape: Sequence[int] | None = None) -> Rule:
  """A torch Linear/Conv weight `[out, in…]` ↔ our kernel `[*in_shape, *out_shape]`.

  Torch stores `[out, in]` and computes `x @ W.T`; our einsum kernels are `[in…, out…]`, so the
  transform is a transpose plus reshapes that split heads (e.g. `[N·H, D]` → `[D, N, H]`).
  `hf_shape` restores a multi-axis torch weight (a Conv3d's `[out, C, t, p, p]`) on the way back.
  """
  in_shape, out_shape = tuple(in_shape), tuple(out_shape)
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)

  def to_ours(w):
    return w.reshape(n_out, n_in).T.reshape(*in_shape, *out_shape)

  def to_hf(w):
    w = w.reshape(n_in, n_out).T
    return w.reshape(hf_shape) if hf_shape is not None else w

  return Rule(hf_name, ours, to_ours, to_hf)


def reshaped(hf_name: str, ours: tuple[str, ...], ours_shape: Sequence[int],
             hf_shape: Sequence[int]) -> Rule:
  """Same element order, different shape (biases split into heads, conv kernels flattened)."""
  ours_shape, hf_shape = tuple(ours_shape), tuple(hf_shape)
  return Rule(hf_name, ours, lambda w: w.reshape(ours_shape), lambda w: w.reshape(hf_shape))


def same(hf_name: str, ours: tuple[str, ...]) -> Rule:
  return Rule(hf_name, ours)


class ConversionError(ValueError):
  """Checkpoint tensors do not fit the model; the message names every offending key."""

  def __init__(self, problems: Sequence[str], consumed: Sequence[str] = ()):
    super().__init__("checkpoint does not match the model:\n  " + "\n  ".join(problems))
    self.problems, self.consumed = list(problems), list(consumed)


def variable_at(module, path: Sequence[str]) -> nnx.Variable:
  obj = module
  for part in path:
    obj = getattr(obj, part)
  if not isinstance(obj, nnx.Variable):
    raise TypeError(f"{'.'.join(path)} is a {type(obj).__name__}, not a parameter")
  return obj


def load_into(module, rules: Sequence[Rule], get: Callable[[str], np.ndarray | None], *,
              num_layers: int, prefix: str = "",
              place: Callable[[nnx.Variable, np.ndarray], jax.Array] | None = None) -> list[str]:
  """Fills `module`'s parameters from Hugging Face tensors, one parameter at a time.

  `get(name)` returns one tensor (or None when absent) so a caller can stream from disk; a stacked
  parameter is assembled from its L per-layer tensors before it is placed, so host memory holds one
  parameter at a time. `place(var, array)` puts the array on devices (default: `jnp.asarray` in the
  variable's dtype). Returns the consumed names; raises ConversionError listing every missing or
  mis-shaped key (its `consumed` includes the mis-shaped ones, which were found).
  """
  consumed, problems = [], []
  for rule in rules:
    var = variable_at(module, rule.ours)
    shape, dtype = tuple(var.get_value().shape), var.get_value().dtype
    before = len(problems)
    names = ([prefix + rule.hf.format(i=i) for i in range(num_layers)] if rule.stacked
             else [prefix + rule.hf])
    slice_shape = shape[1:] if rule.stacked else shape
    out = np.empty(shape, dtype=np.dtype(dtype)) if rule.stacked else None
    for i, name in enumerate(names):
      tensor = get(name)
      if tensor is None:
        problems.append(f"missing: {name}")
        continue
      try:
        converted = rule.to_ours(np.asarray(tensor))
      except ValueError:  # a reshape that cannot hold this many elements
        converted = None
      if converted is None or converted.shape != slice_shape:
        problems.append(f"shape mismatch: {name} has {tuple(tensor.shape)}, but "
                        f"{'.'.join(rule.ours)} needs {slice_shape} per layer" if rule.stacked
                        else f"shape mismatch: {name} has {tuple(tensor.shape)}, but "
                        f"{'.'.join(rule.ours)} needs {slice_shape}")
        consumed.append(name)  # found, and reported as mis-shaped: not also "unexpected"
        continue
      consumed.append(name)
      if rule.stacked:
        out[i] = converted
      else:
        out = converted
    if len(problems) == before:
      array = out.astype(np.dtype(dtype), copy=False)
      var.set_value(place(var, array) if place else jnp.asarray(array))
  if problems:
    raise ConversionError(problems, consumed)
  return consumed


def export(module, rules: Sequence[Rule], *, num_layers: int, prefix: str = ""):
  """Yields `(hf_name, np.ndarray)` pairs, one tensor at a time, for `module`'s parameters."""
  for rule in rules:
    value = np.asarray(jax.device_get(variable_at(module, rule.ours).get_value()))
    if rule.stacked:
      for i in range(num_layers):
        yield prefix + rule.hf.format(i=i), rule.to_hf(value[i])
    else:
      yield prefix + rule.hf, rule.to_hf(value)
