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

import numpy as np

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
