"""Qwen2.5-VL vision tower: patch embedding, 2-D RoPE, window/full attention blocks, 2x2 merger.

Images arrive packed: `pixel_values [P, patch_dim]` holds every image's patches one after another and
the static `grid_thw` says how many (t, h, w) patches each image has. Everything that depends only on
the grid — the window permutation, its inverse, rotary positions and the attention groups — is
computed once with NumPy and enters the compiled program as constants, so one XLA program serves
every call with the same grid.

Attention runs per group: per frame in the full-attention blocks, per 4x4 merged-token window in
the others, as batched [B, W, N, T, S] scores over the groups' own tokens (never over the packed
batch, so memory and FLOPs grow linearly with the number of images). When every image has the same
grid (the loader resizes to one size), the tower runs on an image axis B with one layout for all
(B images × P/B patches), which the caller's sharding of the patch rows carries over; images of
different sizes are packed into one sequence (B = 1) whose groups are padded to the longest. All
blocks share one stacked parameter set under a single `scan`; each block's choice of groups is a
`lax.cond` on a scan input.

Einsums use the package alphabet (`robot_r1_jax`), C among it for the fused (q, k, v) axis.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robot_r1_jax.model import attention, sharding
from robot_r1_jax.model.config import VisionConfig
from robot_r1_jax.model.hf_names import Rule, dense, reshaped, same
from robot_r1_jax.model.layers import RMSNorm, param, scan, stack

Grid = tuple[tuple[int, int, int], ...]
# attend(q, k, v) → the attention output, [B, T, N, H] each: one block's choice of groups.
Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# Hugging Face hard-codes this epsilon for every vision RMSNorm (blocks and merger).
_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# Grid layout (NumPy, trace-time constants).


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """Where each patch goes for one packed `grid_thw`, in the window-permuted order the blocks see.

  patch_order:     [P] int32, permuted position → original patch index (a gather index).
  merged_restore:  [P / m²] int32, original merged-token index → permuted merged-token index.
  positions:       [P, 2] int32 (row, column) rotary positions, permuted.
  frame_segments:  [P] int32, one id per image frame (full-attention blocks).
  window_segments: [P] int32, one id per non-empty window (window-attention blocks).
  """

  patch_order: np.ndarray
  merged_restore: np.ndarray
  positions: np.ndarray
  frame_segments: np.ndarray
  window_segments: np.ndarray

  @functools.cached_property
  def frames(self) -> Groups:
    return Groups.of(self.frame_segments)

  @functools.cached_property
  def windows(self) -> Groups:
    return Groups.of(self.window_segments)


@dataclasses.dataclass(frozen=True, eq=False)
class Groups:
  """Contiguous runs of equal segment id (frames or windows) as a [W, L] table of positions,
  padded to the longest run: the attention groups of one image layout.

  index:   [W, L] int32, the position of each slot (0 in padding slots).
  valid:   [W, L] bool, False on padding slots.
  inverse: [T] int32, the flat slot w·L + l of each position.
  regular: every run has length L and `index` is arange(T).reshape(W, L), so grouping is a
           reshape (no gather, no padding).
  """

  index: np.ndarray
  valid: np.ndarray
  inverse: np.ndarray
  regular: bool

  @classmethod
  def of(cls, segments: np.ndarray) -> Groups:
    starts = np.flatnonzero(np.diff(segments, prepend=-1))
    lengths = np.diff(np.append(starts, len(segments)))
    slots = np.arange(lengths.max())
    valid = slots[None] < lengths[:, None]
    index = np.where(valid, starts[:, None] + slots[None], 0).astype(np.int32)
    group = np.repeat(np.arange(len(starts)), lengths)
    inverse = (group * len(slots) + np.arange(len(segments)) - starts[group]).astype(np.int32)
    return cls(index=index, valid=valid, inverse=inverse,
               regular=bool((lengths == len(slots)).all()))

  def gather(self, x: jax.Array) -> jax.Array:
    """[B, T, …] in layout order → [B, W, L, …] by group."""
    w, l = self.index.shape
    if not self.regular:
      x = jnp.take(x, jnp.asarray(self.index.reshape(-1)), axis=1)
    return x.reshape(x.shape[:1] + (w, l) + x.shape[2:])

  def scatter(self, x: jax.Array) -> jax.Array:
    """[B, W, L, …] by group → [B, T, …] in layout order (padding slots dropped)."""
    x = x.reshape(x.shape[:1] + (-1,) + x.shape[3:])
    return x if self.regular else jnp.take(x, jnp.asarray(self.inverse), axis=1)


def _check_grid(cfg: VisionConfig, grid_thw: Grid) -> Grid:
  """`grid_thw` as a tuple of int triples; raises ValueError naming the bad entry."""
  m = cfg.spatial_merge_size
  if not grid_thw:
    raise ValueError("grid_thw is empty: the vision tower needs at least one image")
  for i, thw in enumerate(grid_thw):
    if len(thw) != 3 or any(not isinstance(n, (int, np.integer)) or n <= 0 for n in thw):
      raise ValueError(f"grid_thw[{i}]={thw!r} must be three positive ints (t, h, w)")
    if thw[1] % m or thw[2] % m:
      raise ValueError(f"grid_thw[{i}]={tuple(thw)}: h and w must be multiples of "
                       f"spatial_merge_size={m}")
  return tuple(tuple(int(n) for n in thw) for thw in grid_thw)


def grid_layout(cfg: VisionConfig, grid_thw: Grid) -> Layout:
  """The window permutation, rotary positions and segment ids for `grid_thw` (HF's order).

  Reproduces transformers' `get_vision_window_index`, `get_vision_position_ids` and
  `get_vision_cu_seqlens`: windows are `window_size / patch / merge` merged tokens on a side, taken
  row-major per frame; padding windows (HF pads a whole extra window row/column even when the grid
  divides evenly) own no tokens, so they simply never get a segment id.
  """
  return _layout(cfg, _check_grid(cfg, grid_thw))


@functools.lru_cache(maxsize=64)
def _layout(cfg: VisionConfig, grid_thw: Grid) -> Layout:
  m = cfg.spatial_merge_size
  unit = m * m
  side = cfg.window_size // m // cfg.patch_size
  window_order, positions, frames, windows = [], [], [], []
  merged_offset = frame_offset = window_offset = 0
  for t, h, w in grid_thw:
    gh, gw = h // m, w // m
    tt, rr, cc = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
    windows_per_frame = -(-gh // side) * -(-gw // side)
    window_id = (tt * windows_per_frame + (rr // side) * -(-gw // side) + cc // side).reshape(-1)
    # A stable sort keeps row-major order inside each window, as HF's padded reshape does.
    order = np.argsort(window_id, kind="stable")
    window_order.append(order + merged_offset)
    # Compact ids: windows that own no token vanish, like HF's unique_consecutive.
    _, compact = np.unique(window_id[order], return_inverse=True)
    windows.append(np.repeat(compact + window_offset, unit))
    frames.append(np.repeat(tt.reshape(-1)[order] + frame_offset, unit))
    # Patches are stored merge-unit-major: within one merged token, m rows of m columns.
    unit_r, unit_c = np.divmod(np.arange(unit), m)
    row = (rr.reshape(-1)[order, None] * m + unit_r).reshape(-1)
    col = (cc.reshape(-1)[order, None] * m + unit_c).reshape(-1)
    positions.append(np.stack([row, col], axis=-1))
    merged_offset += t * gh * gw
    frame_offset += t
    window_offset += compact.max() + 1
  window_index = np.concatenate(window_order)
  patch_order = (window_index[:, None] * unit + np.arange(unit)).reshape(-1)
  arrays = dict(patch_order=patch_order, merged_restore=np.argsort(window_index),
                positions=np.concatenate(positions), frame_segments=np.concatenate(frames),
                window_segments=np.concatenate(windows))
  arrays = {k: v.astype(np.int32) for k, v in arrays.items()}
  for a in arrays.values():
    a.flags.writeable = False  # Cached and shared between calls.
  return Layout(**arrays)


# ----------------------------------------------------------------------------------------------
# Rotary embedding and attention.


def rotary_cos_sin(cfg: VisionConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """fp32 cos/sin `[P, H]` for (row, column) `positions [P, 2]`; rows fill H/4 frequencies, columns
  the next H/4, and the H/2 result is repeated for rotate-half (HF's axial layout)."""
  quarter = jnp.arange(0, cfg.head_dim // 2, 2, dtype=jnp.float32) / (cfg.head_dim // 2)
  inv_freq = 1.0 / (cfg.rope_theta**quarter)
  # Integer positions go to fp32 before the product, as HF's `position_ids.float()` does.
  freqs = positions.astype(jnp.float32)[:, :, None] * inv_freq  # [P, 2, H/4]
  half = freqs.reshape(freqs.shape[0], -1)  # [P, H/2]: rows then columns
  angles = jnp.concatenate([half, half], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, N, H] rotated by cos/sin [T, H]; in fp32 and cast back, as HF's vision RoPE does."""
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


def _affine(spec: str, x: jax.Array, kernel: nnx.Param, bias: nnx.Param) -> jax.Array:
  """`einsum(spec, x, kernel) + bias` in x's (compute) dtype."""
  # Parameters are stored in param_dtype and cast at use, so fp32 storage works under bf16 compute.
  return jnp.einsum(spec, x, kernel[...].astype(x.dtype)) + bias[...].astype(x.dtype)


def group_attention(q: jax.Array, k: jax.Array, v: jax.Array, groups: Groups,
                    implementation: str = "xla") -> jax.Array:
  """Bidirectional attention within each group; q, k, v `[B, T, N, H]` → `[B, T, N, H]`.

  Scores are [B, W, N, L, L]: each group's tokens against its own (a padding slot is never a key),
  so nothing grows with the square of B·T.
  """
  q, k, v = groups.gather(q), groups.gather(k), groups.gather(v)  # [B, W, L, N, H]
  valid = None if groups.regular else groups.valid
  return groups.scatter(attention.grouped(q, k, v, valid, implementation))


# ----------------------------------------------------------------------------------------------
# Modules.


class VisionAttention(nnx.Module):
  """Fused-QKV multi-head attention with biases; the QKV kernel keeps HF's [3][N][H] output order."""

  def __init__(self, cfg: VisionConfig, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
    d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    self.qkv = param(rngs, (d, 3, n, h), ("embed", None, "heads", "head_dim"), param_dtype)
    self.qkv_bias = param(rngs, (3, n, h), (None, "heads", "head_dim"), param_dtype)
    self.out = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), param_dtype)
    self.out_bias = param(rngs, (d,), ("embed",), param_dtype)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, attend: Attend) -> jax.Array:
    """x [B, T, D], cos/sin [T, H] → [B, T, D]; `attend(q, k, v)` picks the groups."""
    q, k, v = jnp.unstack(_affine("BTD,DCNH->BTCNH", x, self.qkv, self.qkv_bias), axis=2)
    attn = attend(_rotate(q, cos, sin), _rotate(k, cos, sin), v)
    return _affine("BTNH,NHD->BTD", attn, self.out, self.out_bias)


class VisionMLP(nnx.Module):
  """SwiGLU with biases: down(silu(gate(x)) · up(x))."""

  def __init__(self, cfg: VisionConfig, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate = param(rngs, (d, f), ("embed", "mlp"), param_dtype)
    self.gate_bias = param(rngs, (f,), ("mlp",), param_dtype)
    self.up = param(rngs, (d, f), ("embed", "mlp"), param_dtype)
    self.up_bias = param(rngs, (f,), ("mlp",), param_dtype)
    self.down = param(rngs, (f, d), ("mlp", "embed"), param_dtype)
    self.down_bias = param(rngs, (d,), ("embed",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] → [B, T, D]."""
    gate = _affine("BTD,DF->BTF", x, self.gate, self.gate_bias)
    up = _affine("BTD,DF->BTF", x, self.up, self.up_bias)
    return _affine("BTF,FD->BTD", jax.nn.silu(gate) * up, self.down, self.down_bias)


class VisionBlock(nnx.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

  def __init__(self, cfg: VisionConfig, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
    self.norm1 = RMSNorm(cfg.hidden_size, eps=_NORM_EPS, param_dtype=param_dtype)
    self.norm2 = RMSNorm(cfg.hidden_size, eps=_NORM_EPS, param_dtype=param_dtype)
    self.attn = VisionAttention(cfg, param_dtype=param_dtype, rngs=rngs)
    self.mlp = VisionMLP(cfg, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, attend: Attend) -> jax.Array:
    x = x + self.attn(self.norm1(x), cos, sin, attend)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """RMSNorm, then each merge unit's m² patches concatenated and mapped by Linear–GELU–Linear."""

  def __init__(self, cfg: VisionConfig, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
    wide = cfg.hidden_size * cfg.spatial_merge_size**2
    self.wide = wide
    self.norm = RMSNorm(cfg.hidden_size, eps=_NORM_EPS, param_dtype=param_dtype)
    self.fc1 = param(rngs, (wide, wide), ("merge", "mlp"), param_dtype)
    self.fc1_bias = param(rngs, (wide,), ("mlp",), param_dtype)
    self.fc2 = param(rngs, (wide, cfg.out_hidden_size), ("mlp", "embed"), param_dtype)
    self.fc2_bias = param(rngs, (cfg.out_hidden_size,), ("embed",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] → [B, T / m², out_hidden_size]."""
    x = self.norm(x).reshape(x.shape[0], -1, self.wide)
    x = _affine("BTD,DF->BTF", x, self.fc1, self.fc1_bias)
    # HF's nn.GELU() is the exact erf form.
    return _affine("BTF,FD->BTD", jax.nn.gelu(x, approximate=False), self.fc2, self.fc2_bias)


class VisionTower(nnx.Module):
  """Qwen2.5-VL's `visual` module: packed patches `[P, patch_dim]` → merged tokens `[P/m², out]`."""

  def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, remat: bool = False,
               attention_implementation: str = "xla", rngs: nnx.Rngs):
    self.cfg, self.dtype, self.remat = cfg, dtype, remat
    self.attention_implementation = attention_implementation
    # Conv3d with stride == kernel over one patch is a single matmul over the flattened patch.
    self.patch_embed = param(rngs, (cfg.patch_dim, cfg.hidden_size), ("patch", "embed"),
                             param_dtype)
    self.blocks = stack(lambda r: VisionBlock(cfg, param_dtype=param_dtype, rngs=r), cfg.depth,
                        rngs)
    self.merger = PatchMerger(cfg, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixel_values: jax.Array, grid_thw: Grid) -> jax.Array:
    """pixel_values [P, patch_dim], static grid_thw → [P / m², out_hidden_size] in `dtype`.

    Images are packed in `grid_thw` order and come out in the same order, as Hugging Face's.
    """
    cfg = self.cfg
    grid_thw = _check_grid(cfg, grid_thw)
    expected = sum(t * h * w for t, h, w in grid_thw)
    if pixel_values.shape != (expected, cfg.patch_dim):
      raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)} but grid_thw="
                       f"{list(grid_thw)} needs ({expected}, {cfg.patch_dim})")
    # Images of one grid share one layout along an image axis; others are packed into one.
    images = len(grid_thw) if len(set(grid_thw)) == 1 else 1
    layout = _layout(cfg, grid_thw[:1] if images > 1 else grid_thw)
    # HF casts the pixels to the patch-embedding weight's dtype; here both go to the compute dtype,
    # which every later layer inherits from x.
    x = pixel_values.astype(self.dtype) @ self.patch_embed[...].astype(self.dtype)  # [P, D]
    # Images over the batch axes of the mesh: left to XLA, a TPU compile gathered every image's
    # activations and scores onto every chip.
    x = sharding.constrain(x.reshape(images, -1, x.shape[-1])[:, layout.patch_order],
                           ("batch", None, None))  # [B, P / B, D]
    cos, sin = rotary_cos_sin(cfg, jnp.asarray(layout.positions))
    is_full = np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes)

    impl = self.attention_implementation

    def body(block: VisionBlock, h: jax.Array, full: jax.Array):
      def attend(q, k, v):
        return jax.lax.cond(full, lambda: group_attention(q, k, v, layout.frames, impl),
                            lambda: group_attention(q, k, v, layout.windows, impl))

      return sharding.constrain(block(h, cos, sin, attend), ("batch", None, None)), None

    x, _ = scan(self.blocks, body, x, jnp.asarray(is_full), remat=self.remat)
    merged = self.merger(x)[:, layout.merged_restore]
    return merged.reshape(-1, merged.shape[-1])


# ----------------------------------------------------------------------------------------------
# Hugging Face names (relative to the `visual.` / `model.visual.` prefix).


def hf_rules(cfg: VisionConfig) -> list[Rule]:
  """Rules between HF's `Qwen2_5_VisionTransformerPretrainedModel` and `VisionTower`.

  HF names are relative to the vision module (`blocks.{i}.attn.qkv.weight`); the caller adds the
  checkpoint's prefix (`visual.` on the hub, `model.visual.` in transformers 5 memory).
  """
  d, n, h, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
  wide = d * cfg.spatial_merge_size**2
  conv = (d, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
  b = "blocks.{i}."
  return [
      dense("patch_embed.proj.weight", ("patch_embed",), (cfg.patch_dim,), (d,), hf_shape=conv),
      same(b + "norm1.weight", ("blocks", "norm1", "scale")),
      same(b + "norm2.weight", ("blocks", "norm2", "scale")),
      dense(b + "attn.qkv.weight", ("blocks", "attn", "qkv"), (d,), (3, n, h)),
      reshaped(b + "attn.qkv.bias", ("blocks", "attn", "qkv_bias"), (3, n, h), (3 * d,)),
      dense(b + "attn.proj.weight", ("blocks", "attn", "out"), (n, h), (d,)),
      same(b + "attn.proj.bias", ("blocks", "attn", "out_bias")),
      dense(b + "mlp.gate_proj.weight", ("blocks", "mlp", "gate"), (d,), (f,)),
      same(b + "mlp.gate_proj.bias", ("blocks", "mlp", "gate_bias")),
      dense(b + "mlp.up_proj.weight", ("blocks", "mlp", "up"), (d,), (f,)),
      same(b + "mlp.up_proj.bias", ("blocks", "mlp", "up_bias")),
      dense(b + "mlp.down_proj.weight", ("blocks", "mlp", "down"), (f,), (d,)),
      same(b + "mlp.down_proj.bias", ("blocks", "mlp", "down_bias")),
      same("merger.ln_q.weight", ("merger", "norm", "scale")),
      dense("merger.mlp.0.weight", ("merger", "fc1"), (wide,), (wide,)),
      same("merger.mlp.0.bias", ("merger", "fc1_bias")),
      dense("merger.mlp.2.weight", ("merger", "fc2"), (wide,), (cfg.out_hidden_size,)),
      same("merger.mlp.2.bias", ("merger", "fc2_bias")),
  ]
