"""Vision tower forward (small preset, 224² images): per-group attention vs the packed attention it
replaced, measured in one run.

    python bench/vision_tower.py [--images 16 32] [--repeats 3]

"packed" runs the same tower with every block's attention over all patches of the batch at once,
restricted by a segment mask (the tower's algorithm until per-group attention): [N, P, P] scores
for P patches of the whole batch. It is swapped in for this measurement only, and its output is
compared with the tower's. Reported per image count: compiled temporaries (XLA's memory analysis)
and the best forward time of `--repeats`, for both, and their ratios.
"""

from __future__ import annotations

import argparse
import os
import time
from unittest import mock

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after choosing the platform)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from robot_r1_jax.model import config as config_lib  # noqa: E402
from robot_r1_jax.model import layers, vision  # noqa: E402

from machine import cpu_model  # noqa: E402


def packed_attention(q: jax.Array, k: jax.Array, v: jax.Array, groups: vision.Groups,
                     implementation: str = "xla") -> jax.Array:
  """The replaced algorithm: one [N, B·T, B·T] score matrix over the whole batch, masked to the
  groups (q, k, v [B, T, N, H]; xla only)."""
  del implementation
  b, t = q.shape[:2]
  group = np.asarray(groups.inverse) // groups.index.shape[1]  # [T]
  segments = jnp.asarray((np.arange(b)[:, None] * (group.max() + 1) + group).reshape(-1))
  q, k, v = (x.reshape((b * t,) + x.shape[2:]) for x in (q, k, v))
  scores = jnp.einsum("TNH,SNH->NTS", q, k) * q.shape[-1]**-0.5
  scores = jnp.where(segments[:, None] == segments[None, :], scores.astype(jnp.float32),
                     jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("NTS,SNH->TNH", probs, v).reshape((b, t) + q.shape[1:])


def measure(graphdef, state, pixels: jax.Array, grid: vision.Grid, repeats: int
            ) -> tuple[float, float, np.ndarray]:
  """(temporaries in MiB, best forward seconds, output)."""
  compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, grid)).lower(state, pixels).compile()
  out = np.asarray(compiled(state, pixels))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    compiled(state, pixels).block_until_ready()
    times.append(time.perf_counter() - start)
  return compiled.memory_analysis().temp_size_in_bytes / 2**20, min(times), out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, nargs="+", default=[16, 32])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  cfg = config_lib.small().vision
  tower = nnx.eval_shape(lambda: vision.VisionTower(cfg, rngs=nnx.Rngs(0)))
  layers.materialize(tower, 0)
  graphdef, state = nnx.split(tower)
  print(f"small preset vision tower ({cfg.depth} blocks, width {cfg.hidden_size}), 224² images "
        f"(256 patches each), {jax.devices()[0].platform}, CPU: {cpu_model()}")
  print(f"{'images':>6}  {'temp MiB grouped':>16}  {'packed':>8}  {'×':>5}  "
        f"{'forward s grouped':>17}  {'packed':>7}  {'×':>5}  {'max |Δ|':>8}")
  for n in args.images:
    grid = ((1, 16, 16),) * n
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(n * 256, cfg.patch_dim)),
                         jnp.float32)
    mem, seconds, out = measure(graphdef, state, pixels, grid, args.repeats)
    with mock.patch.object(vision, "group_attention", packed_attention):
      old_mem, old_seconds, old_out = measure(graphdef, state, pixels, grid, args.repeats)
    print(f"{n:>6}  {mem:>16.1f}  {old_mem:>8.1f}  {old_mem / mem:>5.1f}  {seconds:>17.3f}  "
          f"{old_seconds:>7.3f}  {old_seconds / seconds:>5.1f}  "
          f"{np.abs(out - old_out).max():>8.1e}")


if __name__ == "__main__":
  main()
