"""What the benchmarks print about the machine they ran on (figures are only comparable on one)."""

from __future__ import annotations

import platform
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
  try:
    for line in open("/proc/cpuinfo", encoding="utf-8"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def alternating_medians(fns, repeats: int) -> list[float]:
  """Median wall seconds of each of `fns`, called in turn `repeats` times: the sides alternate,
  so all see the same background load (timing one side's repeats and then the other's compares
  different moments of a shared machine)."""
  times = [[_seconds(fn) for fn in fns] for _ in range(repeats)]
  return [statistics.median(t[i] for t in times) for i in range(len(fns))]


def _seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def gemm_flops_per_second(n: int = 1024, repeats: int = 30) -> float:
  """The machine's peak f32 GEMM rate: the fastest of many short runs (a median of a few read
  150–195 GFLOP/s on one quiet 2-core machine, which moved the ratio more than any code change)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n**3 / min(times)


class TextMatmuls:
  """The text model's weight matmuls alone, timed on this machine: a floor under any program that
  multiplies every row by every weight (a forward, a prefill, one decode step).

  Each layer weight takes [M, in] rows (in = D, or N·H for o, or F for down) and the LM head
  [M_head, D]; nothing else runs (no attention, norms, RoPE, sampling) and the products are
  independent, so XLA may overlap them. Small M is bounded by streaming the weights from memory
  (the decode step), large M by the machine's GEMM rate (the prefill): this measures whichever
  binds, with the model's own weights (distinct buffers, as the model reads them).
  """

  def __init__(self, model):
    text = model.text
    cfg = text.cfg
    # Activation widths a weight can contract: hidden, MLP, and attention output (o's input).
    widths = {cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim}
    self._weights = []  # [in, out], one buffer per layer
    for path, leaf in nnx.to_flat_state(nnx.state(text.layers, nnx.Param)):
      if str(path[-1]).endswith(("bias", "scale")):
        continue
      for w in leaf[...]:
        contracted = 1
        for size in w.shape:
          contracted *= size
          if contracted in widths:
            break
        else:
          raise ValueError(f"{'.'.join(map(str, path))} {w.shape}: no leading axes of width "
                           f"{sorted(widths)}")
        self._weights.append(jnp.array(w.reshape(contracted, -1)))
    weight, axes = model.head_weight()
    self._head = jnp.array(weight.T if axes == "VD" else weight)  # [D, V]
    self._widths = sorted(widths)

    def products(inputs, weights, head_x, head):
      return [inputs[w.shape[0]] @ w for w in weights], head_x @ head

    self._program = jax.jit(products)

  def flops(self, rows: int, head_rows: int) -> int:
    """Multiply-adds ×2 of every layer weight on `rows` rows plus the head on `head_rows`."""
    return 2 * rows * sum(w.size for w in self._weights) + 2 * head_rows * self._head.size

  def seconds(self, rows: int, head_rows: int, repeats: int = 5) -> float:
    """Median wall seconds of every layer weight on `rows` rows plus the head on `head_rows`."""
    inputs = {width: jnp.ones((rows, width)) for width in self._widths}
    head_x = jnp.ones((head_rows, self._head.shape[0]))
    run = lambda: jax.block_until_ready(self._program(inputs, self._weights, head_x, self._head))
    run()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
    return statistics.median(times)
