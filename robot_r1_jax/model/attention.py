"""The one attention seam: every attention of the model (prefill, scoring, the update's forward,
the decode step, the vision windows and frames) goes through the functions here, and the masks
each needs are stated here once.

Implementations (`IMPLEMENTATIONS`):
  `xla`     einsum scores, an fp32 softmax and a second einsum, with Hugging Face's eager
            numerics (scale after the product, softmax in fp32, probabilities back in the compute
            dtype): the parity reference and the CPU path. Forms [rows, heads, T, S] scores.
  `splash`  the Pallas splash-attention kernel that JAX ships for TPU
            (`jax.experimental.pallas.ops.tpu.splash_attention`): blockwise online softmax, so no
            [T, S] scores exist in either pass, and blocks the causal mask rules out are skipped.
            Sequences are padded to its 128-row blocks; under a mesh it runs in a `shard_map`
            over rows and heads (the kernel is one device's program).
  `splash_interpret`  the same kernel through the Pallas interpreter, on any backend (the CPU
            tests; slow).
  `cudnn`   `jax.nn.dot_product_attention` with cuDNN's fused flash attention (GPUs; bf16 or
            fp16 compute): the masks go in as a boolean [B, 1, T, S] array (cuDNN adds it as
            a bias), odd lengths padded to even.
  `dot_product`  the same call with the library's own XLA implementation, on any backend: what
            the CPU tests compare with xla (the layouts and masks `cudnn` is given).
`resolve("auto", platform)` picks splash on TPU and xla elsewhere (cudnn is chosen by name until
a GPU has measured it against xla). The one-token decode step
always takes the xla form: it reads the cache where it lies, one query against S slots, and the
compile report puts it at the HBM floor (it moves the cache and the weights, not scores).

Layouts use the package alphabet with Q for the N/K query heads that share one kv head: queries
[B, K, Q, T, H] (head n = k·Q + q, as HF's repeat_kv lays them out), keys transposed
[B, K, H, S] and values [B, K, S, H], the layout the cache keeps and the xla dots read without
repacking.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from robot_r1_jax.model import sharding

IMPLEMENTATIONS = ("auto", "xla", "splash", "splash_interpret", "cudnn", "dot_product")
# The implementations that call `jax.nn.dot_product_attention`, and the one each asks it for.
_LIBRARY = {"cudnn": "cudnn", "dot_product": None}

# The splash kernel's tiles: its sequence blocks are multiples of 128 rows.
_BLOCK = 128
# Segment ids for the kernel: real tokens, padding tokens, and the rows added to reach a whole
# block (a third id, so that they see only each other).
_REAL, _PAD, _FILL = 1, 0, 2


def resolve(name: str, platform: str) -> str:
  """`name` with "auto" replaced by the choice for `platform` ("tpu", "gpu", "cpu")."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"attention={name!r} is not one of {', '.join(IMPLEMENTATIONS)}")
  if name == "cudnn" and platform != "gpu":
    raise ValueError(f"attention=cudnn is cuDNN's flash attention and runs on GPUs; these devices "
                     f"are {platform}: use auto, xla or dot_product")
  if name != "auto":
    return name
  return "splash" if platform == "tpu" else "xla"


def check(implementation: str, dtype: jnp.dtype | None = None) -> str:
  """`implementation` when a model can run it (any of `IMPLEMENTATIONS` but "auto"), computing
  in `dtype` if given."""
  if implementation not in IMPLEMENTATIONS[1:]:
    raise ValueError(f"attention_implementation={implementation!r} is not one of "
                     f"{', '.join(IMPLEMENTATIONS[1:])}")
  if (implementation == "cudnn" and dtype is not None
      and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16)):
    raise ValueError(f"attention=cudnn (cuDNN's flash attention) takes bfloat16 or float16 "
                     f"activations, not {jnp.dtype(dtype).name}: add --compute_dtype=bfloat16")
  return implementation


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prefix:
  """Filled slots a chunk attends to before its own tokens (a read-only prompt cache)."""

  k: jax.Array  # [B, K, H, S]
  v: jax.Array  # [B, K, S, H]
  valid: jax.Array  # [B, S] bool: real tokens


def causal_mask(real: jax.Array, prefix_valid: jax.Array | None = None) -> jax.Array:
  """[B, T, S + T] bool: query t of the chunk sees every real prefix slot and the chunk's real
  tokens up to itself (causal, blind to padding keys). Padding queries may see nothing: their
  outputs are finite and unused."""
  t = real.shape[1]
  mask = (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None] & real[:, None, :]
  return mask if prefix_valid is None else after_prefix(mask, prefix_valid)


def after_prefix(mask: jax.Array, prefix_valid: jax.Array) -> jax.Array:
  """A chunk's mask [B, T, S] → [B, T, S' + S]: every real slot of the prefix [B, S'] precedes
  each query's own slots."""
  b, t, _ = mask.shape
  before = jnp.broadcast_to(prefix_valid[:, None, :], (b, t, prefix_valid.shape[1]))
  return jnp.concatenate([before, mask], axis=2)


def dense(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
          before: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  """xla attention: q [B·G, K, Q, T, H] over keys [B·G, K, H, S] / values [B·G, K, S, H] (and
  first over `before`'s cached keys [B, K, H, S'] / values [B, K, S', H], read where they lie,
  each shared by G consecutive rows; G = 1 when `before` has a row per row) under `mask`
  [B·G, T, S' + S] → [B·G, K, Q, T, H]."""
  scale = q.shape[-1]**-0.5
  logits = jnp.einsum("BKQTH,BKHS->BKQTS", q, k) * scale
  if before is not None:
    # The G rows that share a cached row are queries of one product with its keys (no repeat),
    # their G·Q·T queries one GEMM's rows: left as a [B, G, K, …] batch, XLA's CPU dot computes
    # it transposed in a slower kernel (2.5× on a decode step's prompt scores).
    grouped = _by_prefix(q, before[0].shape[0])
    cached = jnp.einsum("BKMH,BKHS->BKMS", grouped, before[0].astype(q.dtype)) * scale
    logits = jnp.concatenate([_by_row(cached, q.shape), logits], axis=-1)
  # Softmax in fp32 (HF: softmax(dtype=float32) then back to the compute dtype).
  logits = jnp.where(mask[:, None, None], logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  s = v.shape[2]
  out = jnp.einsum("BKQTS,BKSH->BKQTH", probs[..., -s:], v)
  if before is not None:
    cached = _by_prefix(probs[..., :-s], before[1].shape[0])
    out = out + _by_row(jnp.einsum("BKMS,BKSH->BKMH", cached, before[1].astype(q.dtype)),
                        out.shape)
  return out


def _by_prefix(x: jax.Array, b: int) -> jax.Array:
  """[B·G, K, Q, T, X] → [B, K, G·Q·T, X]: the rows that share prefix row b as one block."""
  rows, kh, qh, t, width = x.shape
  x = x.reshape(b, rows // b, kh, qh, t, width).transpose(0, 2, 1, 3, 4, 5)
  return x.reshape(b, kh, -1, width)


def _by_row(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """`_by_prefix`'s inverse: [B, K, G·Q·T, X] → [B·G, K, Q, T, X] (B·G, Q, T from `shape`)."""
  b, kh, _, width = x.shape
  rows, _, qh, t = shape[:4]
  x = x.reshape(b, kh, rows // b, qh, t, width).transpose(0, 2, 1, 3, 4, 5)
  return x.reshape(rows, kh, qh, t, width)


def causal(q: jax.Array, k: jax.Array, v: jax.Array, real: jax.Array, prefix: Prefix | None,
           implementation: str) -> jax.Array:
  """Causal attention of a chunk over `prefix`'s slots and itself: q [B, K, Q, T, H], the chunk's
  keys [B, K, H, T] / values [B, K, T, H], `real` [B, T] → [B, K, Q, T, H]. Masks as
  `causal_mask`."""
  if _splash_interpret(implementation) is None:
    mask = causal_mask(real, None if prefix is None else prefix.valid)
    if implementation in _LIBRARY:
      return _library_causal(q, k, v, mask, prefix, _LIBRARY[implementation])
    return dense(q, k, v, mask, None if prefix is None else (prefix.k, prefix.v))
  b, kh, g, t, h = q.shape
  keys, values, q_ids = k.swapaxes(-1, -2), v, _ids(real)
  kv_ids, offset = q_ids, 0
  if prefix is not None:
    offset = _padded(prefix.valid.shape[1])
    # The prefix is padded on its left, so the chunk starts at a block boundary (`offset`).
    fill = offset - prefix.valid.shape[1]
    keys = jnp.concatenate([_pad(prefix.k.swapaxes(-1, -2).astype(q.dtype), fill, 2, left=True),
                            keys], axis=2)
    values = jnp.concatenate([_pad(prefix.v.astype(q.dtype), fill, 2, left=True), values],
                             axis=2)
    kv_ids = jnp.concatenate([_pad(_ids(prefix.valid), fill, 1, left=True, value=_FILL),
                              kv_ids], axis=1)
  tp = _padded(t)
  # The kernel does not scale: the queries are scaled before it.
  queries = _pad((q * h**-0.5).reshape(b, kh * g, t, h), tp - t, 2)
  keys, values = _pad(keys, tp - t, 2), _pad(values, tp - t, 2)
  q_ids, kv_ids = _pad(q_ids, tp - t, 1, value=_FILL), _pad(kv_ids, tp - t, 1, value=_FILL)
  out = _splash(queries, keys, values, q_ids, kv_ids, causal_offset=offset,
                interpret=_splash_interpret(implementation))
  return out[:, :, :t].reshape(b, kh, g, t, h)


def _library_causal(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                    prefix: Prefix | None, library: str | None) -> jax.Array:
  """`causal` through `jax.nn.dot_product_attention(implementation=library)`: the prefix's and
  the chunk's keys/values in one [B, S, K, H] array, the mask [B, T, S] as `causal_mask`."""
  keys, values = k.transpose(0, 3, 1, 2), v.transpose(0, 2, 1, 3)
  if prefix is not None:
    keys = jnp.concatenate([prefix.k.transpose(0, 3, 1, 2).astype(q.dtype), keys], axis=1)
    values = jnp.concatenate([prefix.v.transpose(0, 2, 1, 3).astype(q.dtype), values], axis=1)
  b, kh, g, t, h = q.shape
  queries = q.transpose(0, 3, 1, 2, 4).reshape(b, t, kh * g, h)  # head n = k·Q + q
  # cuDNN's backward with a mask (which it takes as a bias) needs even lengths: a completion
  # width or a prefix + chunk length is often odd. The added query sees nothing, the added key is
  # seen by no query.
  tq, ts = t % 2, keys.shape[1] % 2
  out = jax.nn.dot_product_attention(
      _pad(queries, tq, 1), _pad(keys, ts, 1), _pad(values, ts, 1),
      mask=_pad(_pad(mask, tq, 1, value=False), ts, 2, value=False)[:, None],
      implementation=library)
  return out[:, :t].reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4)


def grouped(q: jax.Array, k: jax.Array, v: jax.Array, valid: np.ndarray | None,
            implementation: str) -> jax.Array:
  """Bidirectional attention within each group: q, k, v [B, W, L, N, H] → [B, W, L, N, H];
  `valid` [W, L] marks real slots (None: all real). A padding slot is never a key.

  Under splash, groups whose length is not a whole number of the kernel's blocks (the 64-patch
  windows of Qwen2.5-VL) take the xla form: padding them to a block would cost more than the
  kernel saves on scores that small.
  """
  if implementation in _LIBRARY:
    # L, a window's or a frame's patches, is a multiple of the 2×2 merge: even, as cuDNN's
    # masked backward needs.
    b, w, l, n, h = q.shape
    rows = lambda x: x.reshape(b * w, l, n, h)  # [B·W, L, N, H]: the library's layout already
    keys = None if valid is None else jnp.asarray(np.broadcast_to(
        np.asarray(valid)[None], (b, w, l)).reshape(b * w, 1, 1, l))
    out = jax.nn.dot_product_attention(rows(q), rows(k), rows(v), mask=keys,
                                       implementation=_LIBRARY[implementation])
    return out.reshape(b, w, l, n, h)
  interpret = _splash_interpret(implementation)
  if interpret is not None and q.shape[2] % _BLOCK == 0:
    b, w, l, n, h = q.shape
    rows = lambda x: x.reshape(b * w, l, n, h).transpose(0, 2, 1, 3)  # [B·W, N, L, H]
    ids = np.where(True if valid is None else valid, _REAL, _PAD).astype(np.int32)
    ids = jnp.asarray(np.broadcast_to(ids, (b, w, l)).reshape(b * w, l))
    out = _splash(rows(q * h**-0.5), rows(k), rows(v), ids, ids, causal_offset=None,
                  interpret=interpret)
    return out.transpose(0, 2, 1, 3).reshape(b, w, l, n, h)
  # Scaled after the product in the compute dtype, where HF's eager attention scales.
  scores = jnp.einsum("BWTNH,BWSNH->BWNTS", q, k) * q.shape[-1]**-0.5
  # Softmax in fp32 (HF: softmax(..., dtype=float32)), probabilities back in the compute dtype.
  scores = scores.astype(jnp.float32)
  if valid is not None:
    keys = jnp.asarray(valid)[None, :, None, None, :]
    scores = jnp.where(keys, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("BWNTS,BWSNH->BWTNH", probs, v)


# ----------------------------------------------------------------------------------------------
# The splash kernel.


def _splash_interpret(implementation: str) -> bool | None:
  """None for xla and the library calls; for the splash kernel, whether it runs in the Pallas
  interpreter."""
  return (None if check(implementation) in ("xla", *_LIBRARY)
          else implementation == "splash_interpret")


def _padded(n: int) -> int:
  return -(-n // _BLOCK) * _BLOCK


def _pad(x: jax.Array, n: int, axis: int, *, left: bool = False, value=0) -> jax.Array:
  if n == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (n, 0) if left else (0, n)
  return jnp.pad(x, widths, constant_values=value)


def _ids(real: jax.Array) -> jax.Array:
  return jnp.where(real, _REAL, _PAD).astype(jnp.int32)


def _block(n: int) -> int:
  """The largest of 512, 256, 128 that divides n (a multiple of 128)."""
  return next(size for size in (512, 256, _BLOCK) if n % size == 0)


def _kernel(heads: int, t: int, s: int, causal_offset: int | None, interpret: bool):
  """The kernel for one device's [heads, t, H] queries over [K, s, H] keys. Built inside the
  trace, never cached across traces (it holds arrays); the library caches its mask tables."""
  shape = (t, s)
  one = splash.FullMask(shape) if causal_offset is None else splash.CausalMask(shape,
                                                                               causal_offset)
  bq, bkv = _block(t), _block(s)
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                            block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                            block_kv_dq=bkv)
  return splash.make_splash_mha(splash.MultiHeadMask([one] * heads), block_sizes=sizes,
                                head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array, kv_ids: jax.Array, *,
            causal_offset: int | None, interpret: bool) -> jax.Array:
  """The kernel over rows: q [B, N, T, H] (already scaled), k/v [B, K, S, H], segment ids
  [B, T] / [B, S] → [B, N, T, H]. Under a mesh, rows go over its batch axes and heads over
  tensor in a `shard_map` (the kernel has no partitioning rule of its own: left to the
  partitioner, every chip would gather every row)."""

  def local(q, k, v, q_ids, kv_ids):
    kernel = _kernel(q.shape[1], q.shape[2], k.shape[2], causal_offset, interpret)
    return jax.vmap(kernel)(q, k, v, splash.SegmentIds(q_ids, kv_ids))

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q, k, v, q_ids, kv_ids)
  q_spec = sharding.fitted_spec(("batch", "heads", None, None), q.shape, mesh)
  kv_spec = sharding.fitted_spec(("batch", "kv_heads", None, None), k.shape, mesh)
  if q_spec[1] != kv_spec[1]:
    # Query heads split where kv heads cannot be: each device needs the kv heads of its own
    # query heads, so the kv heads are repeated to one per query head and split alike.
    repeat = q.shape[1] // k.shape[1]
    k, v = jnp.repeat(k, repeat, axis=1), jnp.repeat(v, repeat, axis=1)
    kv_spec = q_spec
  ids_spec = jax.sharding.PartitionSpec(q_spec[0], None)
  return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, ids_spec, ids_spec),
                       out_specs=q_spec, check_vma=False)(q, k, v, q_ids, kv_ids)
