"""The Qwen2.5-VL language model: Qwen2 decoder layers with M-RoPE, GQA and a KV cache."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from robot_r1_jax.model import attention, hf_names, layers, rope, sharding
from robot_r1_jax.model.config import TextConfig
from robot_r1_jax.model.packing import Packed


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SharedPrefix:
  """Filled, read-only slots that several consecutive rows of a cache continue: a prompt's keys
  and values held once for its G samples. Prefix row b is read by cache rows [b·G, (b+1)·G),
  G = the cache's rows ÷ the prefix's rows."""

  k: tuple[jax.Array, ...]  # L × [B, K, H, T]
  v: tuple[jax.Array, ...]  # L × [B, K, T, H]
  valid: jax.Array  # [B, T] bool


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys/values of every layer for left-padded rows that share one write index.

  Slots `[0, index)` are filled; `valid` marks which filled slots hold real (non-padding) tokens.
  With a `prefix`, each row attends first to its prefix row's slots, then to its own. Keys are
  stored transposed, in the layout the QKᵀ dot reads without repacking. Each layer has its own
  buffers, not slices of an [L, …] stack: XLA copies a stacked buffer's layer slice before every
  dot that reads it (the whole cache once per generated token), and turning a stack into separate
  buffers inside a decode loop's program held a second copy of the whole cache.
  """

  k: tuple[jax.Array, ...]  # L × [B, K, H, S]
  v: tuple[jax.Array, ...]  # L × [B, K, S, H]
  valid: jax.Array  # [B, S] bool
  index: jax.Array  # [] int32: the next slot to write
  prefix: SharedPrefix | None = None

  @classmethod
  def of_chunk(cls, k: jax.Array, v: jax.Array, real: jax.Array, length: int, dtype: jnp.dtype
               ) -> "KVCache":
    """A cache of `length` slots holding a chunk's stacked keys [L, B, K, H, T] / values
    [L, B, K, T, H] (a scan's outputs) in its first T slots, real where `real` [B, T] is."""
    t = real.shape[1]

    def pad(x: jax.Array, slots: int) -> jax.Array:  # empty slots after the chunk's
      widths = [(0, 0)] * x.ndim
      widths[slots] = (0, length - t)
      return jnp.pad(x.astype(dtype), widths)

    return cls(k=tuple(pad(x, -1) for x in k), v=tuple(pad(x, -2) for x in v),
               valid=jnp.pad(real, [(0, 0), (0, length - t)]),
               index=jnp.asarray(t, jnp.int32))

  def continued(self, rows_per_row: int, length: int) -> "KVCache":
    """A cache of `length` empty slots for `rows_per_row` rows per row of this one, which becomes
    their shared prefix (its unfilled slots are not `valid`, so never read): a prompt's cache
    continued by its G samples holds and reads the prompt's keys/values once, not G times."""
    if self.prefix is not None:
      raise ValueError("a cache that has a prefix cannot become one")
    rows = self.valid.shape[0] * rows_per_row

    def empty(x: jax.Array, slots: int) -> jax.Array:
      shape = [rows, *x.shape[1:]]
      shape[slots] = length
      return jnp.zeros(shape, x.dtype)

    return KVCache(k=tuple(empty(x, -1) for x in self.k), v=tuple(empty(x, -2) for x in self.v),
                   valid=jnp.zeros((rows, length), bool), index=jnp.zeros((), jnp.int32),
                   prefix=SharedPrefix(k=self.k, v=self.v, valid=self.valid))

  @property
  def length(self) -> int:
    """The rows' own slots (a prefix's not counted)."""
    return self.valid.shape[1]

  @property
  def rows_per_prefix(self) -> int:
    """How many consecutive rows read each prefix row (0 without a prefix)."""
    return 0 if self.prefix is None else self.valid.shape[0] // self.prefix.valid.shape[0]

  def map_rows(self, fn: Callable[[jax.Array, int], jax.Array],
               prefix_fn: Callable[[jax.Array, int], jax.Array] | None = None) -> "KVCache":
    """`fn(buffer, row_axis)` applied to every per-row buffer (e.g. taking the live rows), and
    `prefix_fn` (default `fn`) to the prefix's."""
    prefix = self.prefix
    if prefix is not None:
      prefix_fn = fn if prefix_fn is None else prefix_fn
      prefix = SharedPrefix(k=tuple(prefix_fn(x, 0) for x in prefix.k),
                            v=tuple(prefix_fn(x, 0) for x in prefix.v),
                            valid=prefix_fn(prefix.valid, 0))
    return dataclasses.replace(self, k=tuple(fn(x, 0) for x in self.k),
                               v=tuple(fn(x, 0) for x in self.v), valid=fn(self.valid, 0),
                               prefix=prefix)


def _write_chunk(k_buf: jax.Array, v_buf: jax.Array, k: jax.Array, v: jax.Array,
                index: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Keys [..., H, T] into buffers [..., H, S] and values [..., T, H] into [..., S, H] at slot
  `index`, in place."""
  put = lambda buf, new, axis: jax.lax.dynamic_update_slice_in_dim(
      buf, new.astype(buf.dtype), index, axis=axis)
  return put(k_buf, k, -1), put(v_buf, v, -2)


class Attention(nnx.Module):
  """Grouped-query self-attention with q/k/v biases and M-RoPE, through `attention`'s seam."""

  def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype,
               implementation: str, rngs: nnx.Rngs):
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.dtype, self.implementation = dtype, implementation
    self.q = layers.param(rngs, (d, n, h), ("embed", "heads", "head_dim"), param_dtype)
    self.q_bias = layers.zeros_param((n, h), ("heads", "head_dim"), param_dtype)
    self.k = layers.param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.k_bias = layers.zeros_param((k, h), ("kv_heads", "head_dim"), param_dtype)
    self.v = layers.param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.v_bias = layers.zeros_param((k, h), ("kv_heads", "head_dim"), param_dtype)
    self.o = layers.param(rngs, (n, h, d), ("heads", "head_dim", "embed"), param_dtype)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, real: jax.Array,
               prefix: attention.Prefix | None, packed: Packed | None = None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Causal attention of a chunk x [B,T,D] (cos/sin [B,T,H], `real` [B,T]) over `prefix`'s
    slots and itself. Returns the output and the chunk's own keys [B,K,H,T] and values [B,K,T,H]
    (for the caller's cache; unused ones cost nothing under jit). With `packed`, x and the output
    are its packed rows [S,N,D]; attention runs on the padded rows."""
    q, k, v = self._qkv(x, cos, sin, packed)
    out = attention.causal(q, k, v, real, prefix, self.implementation)
    return self._out(out, packed), (k, v)

  def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
             kv: tuple[jax.Array, jax.Array], write_at: jax.Array,
             prefix: tuple[jax.Array, jax.Array] | None = None
             ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The chunk written into this layer's cache buffers `kv` (keys [B·G,K,H,S], values
    [B·G,K,S,H]) at slot `write_at`, then attending over a shared `prefix` (keys [B,K,H,T'],
    values [B,K,T',H], G consecutive rows per prefix row) and them under `mask` [B·G,T,T'+S].
    Returns the output and the updated buffers."""
    q, k, v = self._qkv(x, cos, sin)
    # In place into this layer's own buffers; then one dot per side reads every slot where it
    # lies (no [cache | chunk] concatenation of scores; a shared prefix adds one grouped dot).
    new = _write_chunk(*kv, k, v, write_at)
    k, v = (buf.astype(q.dtype) for buf in new)
    return self._out(attention.dense(q, k, v, mask, prefix)), new

  def _w(self, p: nnx.Param) -> jax.Array:
    return p[...].astype(self.dtype)  # params stay in param_dtype; compute in self.dtype

  def _qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array, packed: Packed | None = None
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries [B,K,Q,T,H], keys [B,K,H,T] and values [B,K,T,H] of x [B,T,D] (or `packed`'s
    rows of it), rotated."""
    w = self._w
    q = jnp.einsum("BTD,DNH->BTNH", x, w(self.q)) + w(self.q_bias)
    k = jnp.einsum("BTD,DKH->BTKH", x, w(self.k)) + w(self.k_bias)
    v = jnp.einsum("BTD,DKH->BTKH", x, w(self.v)) + w(self.v_bias)
    if packed is not None:
      q, k, v = packed.unpack(q), packed.unpack(k), packed.unpack(v)
    q, k = rope.rotate(q, cos, sin), rope.rotate(k, cos, sin)
    b, t, n, h = q.shape
    # Query head n reads kv head n // groups, as HF's repeat_kv lays heads out. Keys, values and
    # queries are laid out kv-head-major ([B,K,…]) and keys transposed ([B,K,H,S]), so each
    # attention dot is a plain GEMM per (b, k): the [B,K,Q,T,S] scores are never transposed and
    # the keys need no repacking (only the small q/k/v move).
    q = q.reshape(b, t, k.shape[2], n // k.shape[2], h).transpose(0, 2, 3, 1, 4)
    return q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)

  def _out(self, out: jax.Array, packed: Packed | None = None) -> jax.Array:
    """[B,K,Q,T,H] → [B,T,D] (`packed`: [S,N,D]): one [B·T, N·H] × [N·H, D] GEMM (contracting N
    and H as two axes makes XLA re-lay out the output projection's weight first)."""
    b, kh, g, t, h = out.shape
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, kh * g * h)
    if packed is not None:
      out = packed.pack(out)
    return out @ self._w(self.o).reshape(kh * g * h, -1)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, d: int, f: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.gate = layers.param(rngs, (d, f), ("embed", "mlp"), param_dtype)
    self.up = layers.param(rngs, (d, f), ("embed", "mlp"), param_dtype)
    self.down = layers.param(rngs, (f, d), ("mlp", "embed"), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    w = lambda p: p[...].astype(self.dtype)
    hidden = jax.nn.silu(x @ w(self.gate)) * (x @ w(self.up))
    return hidden @ w(self.down)


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype,
               attention_implementation: str, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn_norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.attn = Attention(cfg, implementation=attention_implementation, **kw)
    self.mlp_norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, **kw)

  def __call__(self, x, cos, sin, real, prefix, packed=None):
    attn, kv = self.attn(self.attn_norm(x), cos, sin, real, prefix, packed)
    return self._mlp(x + attn), kv

  def decode(self, x, cos, sin, mask, kv, write_at, prefix=None):
    attn, kv = self.attn.decode(self.attn_norm(x), cos, sin, mask, kv, write_at, prefix)
    return self._mlp(x + attn), kv

  def _mlp(self, x):
    return x + self.mlp(self.mlp_norm(x))


class TextModel(nnx.Module):
  """Embedding → L scanned decoder layers → final norm (the LM head lives with the full model)."""

  def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, remat: bool = False,
               attention_implementation: str = "xla", rngs: nnx.Rngs):
    self.cfg, self.dtype, self.remat = cfg, dtype, remat
    self.embedding = layers.param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                                  param_dtype)
    self.layers = layers.stack(
        lambda r: DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype,
                               attention_implementation=attention_implementation, rngs=r),
        cfg.num_layers, rngs)
    self.final_norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                     param_dtype=param_dtype)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """[B, T] ids → [B, T, D] in the compute dtype, D split as the table's."""
    x = jnp.take(self.embedding[...], input_ids, axis=0).astype(self.dtype)
    return sharding.constrain(x, ("batch_data", None, "embed"))

  def unstacked_layers(self) -> tuple[DecoderLayer, ...]:
    """The L decoder layers as separate modules, each parameter sliced out once.

    A decode loop builds them before it starts: scanned layers read every weight through a
    per-layer slice that XLA copies at each step (the whole model, once per token). Layers already
    held separately (`unstack_layers`) are returned as they are, with no copy.
    """
    if isinstance(self.layers, nnx.List):
      return tuple(self.layers)
    graphdef, state = nnx.split(self.layers)
    return tuple(nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
                 for i in range(self.cfg.num_layers))

  def unstack_layers(self) -> None:
    """Holds the layers as L separate modules from now on (`unstacked_layers()`, kept): the
    scanned entry points then run them unrolled (`layers.scan`)."""
    self.layers = nnx.List(self.unstacked_layers())

  # Entry points: a full forward, a prefill into a new cache, one decode step over a cache, and
  # prompts with the chunks that follow them. Each takes embeddings x [B, T, D],
  # M-RoPE positions [3, B, T] and the chunk's attention mask [B, T] (1 on real tokens).

  def __call__(self, x: jax.Array, positions: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """[B, T, D] final-normed hidden states of a causal forward over the chunk."""
    hidden, _ = self._scanned(x, positions, attention_mask, keep_kv=False)
    return hidden

  def prefill(self, x: jax.Array, positions: jax.Array, attention_mask: jax.Array,
              cache_length: int, packed: Packed | None = None) -> tuple[jax.Array, KVCache]:
    """The forward, and a new cache of `cache_length` slots S holding the chunk's keys/values.

    The chunk attends to itself only, not to S empty slots. With `packed` (of `attention_mask`),
    the layers' matmuls run on its rows; the hidden states come back padded, [B, T, D].
    """
    hidden, kv = self._scanned(x, positions, attention_mask, keep_kv=True, packed=packed)
    if packed is not None:
      hidden = packed.unpack(hidden)
    return hidden, KVCache.of_chunk(*kv, attention_mask.astype(bool), cache_length, self.dtype)

  def with_prompt(self, xp: jax.Array, prompt_positions: jax.Array, prompt_mask: jax.Array,
                  x: jax.Array, positions: jax.Array, attention_mask: jax.Array, share: int,
                  packed: Packed | None = None) -> tuple[jax.Array, jax.Array]:
    """Final-normed hidden states of B prompts xp [B, T, D] and of the chunks x [B·share, R, D]
    that follow them (a prompt's `share` chunks adjacent), in one scan over the layers: each layer
    runs the prompts, then the chunks after their prompt's keys/values (every real prompt slot
    precedes the chunk). One scan, not a prefill and a second scan over its cache: the backward
    pass holds one set of layer gradients, and FSDP gathers each layer's weights once.

    With `packed` (of `attention_mask`), the chunks' matmuls run on its rows and their hidden
    states come back as those rows, [S, N, D]: ragged completions cost their real tokens."""
    cos_p, sin_p = self._rope(prompt_positions)
    cos, sin = self._rope(positions)
    real_p, real = prompt_mask.astype(bool), attention_mask.astype(bool)
    repeat = lambda a: jnp.repeat(a, share, axis=0)
    valid = repeat(real_p)

    def body(layer, h, _):
      hp, hx = h
      hp, (k, v) = layer(hp, cos_p, sin_p, real_p, None)
      # In the cache's dtype, as a prefill would have stored them.
      prefix = attention.Prefix(k=repeat(k.astype(self.dtype)), v=repeat(v.astype(self.dtype)),
                                valid=valid)
      hx, _ = layer(hx, cos, sin, real, prefix, packed)
      return (_rows(hp), _rows(hx)), None

    if packed is not None:
      x = packed.pack(x)
    (xp, x), _ = layers.scan(self.layers, body, (_rows(xp), _rows(x)), None, remat=self.remat)
    return self.final_norm(xp), self.final_norm(x)

  def decode(self, layers: tuple[DecoderLayer, ...], x: jax.Array, positions: jax.Array,
             attention_mask: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """The layers one after another (`unstacked_layers()`), each writing the chunk into its own
    buffers of `cache` at `cache.index` (after the cache's prefix, when it has one)."""
    cos, sin = self._rope(positions)
    index, t = cache.index, x.shape[1]
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, attention_mask.astype(bool), index,
                                                axis=1)
    # Query i of the chunk (slot index + i) sees the real slots up to its own: [B, T, S].
    slots = jnp.arange(cache.length)[None, None, :]
    mask = valid[:, None, :] & (slots <= index + jnp.arange(t)[None, :, None])
    prefixes = [None] * len(layers)
    if cache.prefix is not None:
      mask = attention.after_prefix(
          mask, jnp.repeat(cache.prefix.valid, cache.rows_per_prefix, axis=0))
      prefixes = list(zip(cache.prefix.k, cache.prefix.v))
    new_k, new_v = [], []
    for layer, k, v, prefix in zip(layers, cache.k, cache.v, prefixes):
      x, (k, v) = layer.decode(x, cos, sin, mask, (k, v), index, prefix)
      new_k.append(k)
      new_v.append(v)
    return self.final_norm(x), dataclasses.replace(cache, k=tuple(new_k), v=tuple(new_v),
                                                   valid=valid, index=index + t)

  def _rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    cfg = self.cfg
    return rope.mrope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section,
                              self.dtype)

  def _scanned(self, x: jax.Array, positions: jax.Array, attention_mask: jax.Array, *,
               keep_kv: bool, packed: Packed | None = None) -> tuple[jax.Array, tuple | None]:
    """The scanned layers over the chunk; returns the hidden states (`packed`'s rows [S, N, D]
    when given) and, with `keep_kv`, the chunk's stacked keys/values."""
    cos, sin = self._rope(positions)
    real = attention_mask.astype(bool)
    if packed is not None:
      x = packed.pack(x)

    def body(layer, h, _):
      h, kv = layer(h, cos, sin, real, None, packed)
      return _rows(h), kv if keep_kv else None  # keys/values leave the scan only when kept

    x, kv = layers.scan(self.layers, body, _rows(x), None, remat=self.remat)
    return self.final_norm(x), kv


def _rows(h: jax.Array) -> jax.Array:
  """Hidden states [B, T, D] with rows over the mesh's batch axes, between layers: left to XLA,
  the hidden width went over fsdp instead and each layer's attention scores were built for every
  row on every chip."""
  return sharding.constrain(h, ("batch", None, None))


def hf_rules(cfg: TextConfig) -> list[hf_names.Rule]:
  """Names relative to the language-model prefix (`model.` on the hub, `model.language_model.` in
  transformers 5); the LM head is the full model's."""
  d, f, n, k, h = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                   cfg.head_dim)
  at = "layers.{i}.self_attn."
  mlp = "layers.{i}.mlp."
  lay = ("layers",)
  return [
      hf_names.same("embed_tokens.weight", ("embedding",)),
      hf_names.same("layers.{i}.input_layernorm.weight", lay + ("attn_norm", "scale")),
      hf_names.dense(at + "q_proj.weight", lay + ("attn", "q"), (d,), (n, h)),
      hf_names.reshaped(at + "q_proj.bias", lay + ("attn", "q_bias"), (n, h), (n * h,)),
      hf_names.dense(at + "k_proj.weight", lay + ("attn", "k"), (d,), (k, h)),
      hf_names.reshaped(at + "k_proj.bias", lay + ("attn", "k_bias"), (k, h), (k * h,)),
      hf_names.dense(at + "v_proj.weight", lay + ("attn", "v"), (d,), (k, h)),
      hf_names.reshaped(at + "v_proj.bias", lay + ("attn", "v_bias"), (k, h), (k * h,)),
      hf_names.dense(at + "o_proj.weight", lay + ("attn", "o"), (n, h), (d,)),
      hf_names.same("layers.{i}.post_attention_layernorm.weight", lay + ("mlp_norm", "scale")),
      hf_names.dense(mlp + "gate_proj.weight", lay + ("mlp", "gate"), (d,), (f,)),
      hf_names.dense(mlp + "up_proj.weight", lay + ("mlp", "up"), (d,), (f,)),
      hf_names.dense(mlp + "down_proj.weight", lay + ("mlp", "down"), (f,), (d,)),
      hf_names.same("norm.weight", ("final_norm", "scale")),
  ]
