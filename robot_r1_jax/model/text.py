"""The Qwen2.5-VL language model: Qwen2 decoder layers with M-RoPE, GQA and a KV cache."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from robot_r1_jax.model import hf_names, layers, rope
from robot_r1_jax.model.config import TextConfig


@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys/values of every layer for left-padded rows that share one write index.

  Slots `[0, index)` are filled; `valid` marks which filled slots hold real (non-padding) tokens.
  """

  k: jax.Array  # [L, B, S, K, H]
  v: jax.Array  # [L, B, S, K, H]
  valid: jax.Array  # [B, S] bool
  index: jax.Array  # [] int32: the next slot to write

  @classmethod
  def zeros(cls, cfg: TextConfig, batch: int, length: int, dtype: jnp.dtype) -> "KVCache":
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               valid=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32))

  @property
  def length(self) -> int:
    return self.k.shape[2]


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "valid", "index"], meta_fields=[])


class Attention(nnx.Module):
  """Grouped-query self-attention with q/k/v biases and M-RoPE."""

  def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.dtype = dtype
    self.q = layers.param(rngs, (d, n, h), ("embed", "heads", "head_dim"), param_dtype)
    self.q_bias = layers.zeros_param((n, h), ("heads", "head_dim"), param_dtype)
    self.k = layers.param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.k_bias = layers.zeros_param((k, h), ("kv_heads", "head_dim"), param_dtype)
    self.v = layers.param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.v_bias = layers.zeros_param((k, h), ("kv_heads", "head_dim"), param_dtype)
    self.o = layers.param(rngs, (n, h, d), ("heads", "head_dim", "embed"), param_dtype)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
               kv: tuple[jax.Array, jax.Array] | None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Attention of a chunk x [B,T,D] (cos/sin [B,T,H]) over a cache's slots and itself.

    `kv` is the cache's ([B,S,K,H],)*2, read in place, or None; `mask` is [B,T,S+T] with a cache,
    [B,T,T] without. Returns the output and this chunk's own (k, v) when there is a cache.
    """
    w = lambda p: p[...].astype(self.dtype)  # params stay in param_dtype; compute in self.dtype
    q = jnp.einsum("BTD,DNH->BTNH", x, w(self.q)) + w(self.q_bias)
    k = jnp.einsum("BTD,DKH->BTKH", x, w(self.k)) + w(self.k_bias)
    v = jnp.einsum("BTD,DKH->BTKH", x, w(self.v)) + w(self.v_bias)
    q, k = rope.rotate(q, cos, sin), rope.rotate(k, cos, sin)
    b, t, n, h = q.shape
    groups = n // k.shape[2]
    # Query head n reads kv head n // groups, as HF's repeat_kv lays heads out.
    q = q.reshape(b, t, k.shape[2], groups, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k) * (h**-0.5)
    if kv is not None:
      # Cached keys are read in place, never copied: scores over [cache | this chunk].
      cached = jnp.einsum("BTKGH,BSKH->BKGTS", q, kv[0].astype(q.dtype)) * (h**-0.5)
      logits = jnp.concatenate([cached, logits], axis=-1)
    # Softmax in fp32 (HF: softmax(dtype=float32) then back to the compute dtype).
    logits = jnp.where(mask[:, None, None], logits.astype(jnp.float32),
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs[..., -t:], v)
    if kv is not None:
      out = out + jnp.einsum("BKGTS,BSKH->BTKGH", probs[..., :-t], kv[1].astype(q.dtype))
    # Only this chunk's keys/values leave the layer; the caller writes them into the cache once.
    return (jnp.einsum("BTNH,NHD->BTD", out.reshape(b, t, n, h), w(self.o)),
            None if kv is None else (k, v))


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
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn_norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.attn = Attention(cfg, **kw)
    self.mlp_norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, **kw)

  def __call__(self, x, cos, sin, mask, kv):
    attn, kv = self.attn(self.attn_norm(x), cos, sin, mask, kv)
    x = x + attn
    return x + self.mlp(self.mlp_norm(x)), kv


class TextModel(nnx.Module):
  """Embedding → L scanned decoder layers → final norm (the LM head lives with the full model)."""

  def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, remat: bool = False, rngs: nnx.Rngs):
    self.cfg, self.dtype, self.remat = cfg, dtype, remat
    self.embedding = layers.param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                                  param_dtype)
    self.layers = layers.stack(
        lambda r: DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
        cfg.num_layers, rngs)
    self.final_norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                     param_dtype=param_dtype)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """[B, T] ids → [B, T, D] in the compute dtype."""
    return jnp.take(self.embedding[...], input_ids, axis=0).astype(self.dtype)

  def __call__(self, x: jax.Array, positions: jax.Array, attention_mask: jax.Array,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """Runs the decoder on embeddings.

    Args:
      x: [B, T, D] input embeddings.
      positions: [3, B, T] M-RoPE positions.
      attention_mask: [B, T] 1 for real tokens of this chunk.
      cache: None for a full forward; else the cache to extend at `cache.index` (prefill or decode).

    Returns:
      ([B, T, D] final-normed hidden states, the updated cache or None).
    """
    cfg = self.cfg
    cos, sin = rope.mrope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section,
                                  self.dtype)
    t = x.shape[1]
    real = attention_mask.astype(bool)
    # Causal within the chunk and blind to padding keys; padding queries see nothing useful but
    # stay finite. With a cache, every filled real slot precedes the chunk: [B, T, S + T].
    mask = (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None] & real[:, None, :]
    if cache is not None:
      mask = jnp.concatenate(
          [jnp.broadcast_to(cache.valid[:, None, :], (x.shape[0], t, cache.length)), mask], axis=2)

    def body(layer, h, kv):
      h, kv = layer(h, cos, sin, mask, kv)
      return h, kv

    kv_in = None if cache is None else (cache.k, cache.v)
    x, new_kv = layers.scan(self.layers, body, x, kv_in, remat=self.remat)
    if cache is not None:
      k, v = new_kv
      index = cache.index
      # One in-place write of this chunk's [L, B, T, K, H] keys/values (a decode loop's carry).
      put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), index,
                                                                 axis=2)
      cache = KVCache(k=put(cache.k, k), v=put(cache.v, v), index=index + t,
                      valid=jax.lax.dynamic_update_slice_in_dim(cache.valid, real, index, axis=1))
    return self.final_norm(x), cache


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
