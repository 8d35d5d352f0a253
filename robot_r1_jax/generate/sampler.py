"""Batched generation: one prefill per prompt, G samples each, one compiled decode loop.

Rollouts, evaluation and users share it.

One call (`Sampler.__call__`):
  1. host: left-pad the prompts to the prompt bucket T and pick the new-token bucket R (the
     smallest declared buckets that fit), so that a training run compiles once per (T, R);
  2. `prefill` (jit): one forward over the B prompts (and their images) into a cache of their T
     slots; the next-token logits and the M-RoPE deltas are then repeated G times, giving B·G rows
     (row b·G + g is sample g of prompt b), each with R empty slots of its own after its prompt's
     cache, which its G rows share (held and read once, not G times);
  3. decode (jit, cache donated): the first token comes from the prefill logits, then a
     `lax.while_loop` feeds back one token per step, at position `real tokens so far + delta` of its
     row, until every row has emitted a stop token or `max_new_tokens` tokens are out. Token t of
     sample g of prompt p draws with fold_in(fold_in(fold_in(key, p), g), t) (p: the prompt's
     index in the call; `sampling.choose` folds in each draw's round), so a completion does not
     depend on which other prompts share its batch.
     With `compact_every`, the loop runs in segments and the finished rows are dropped between
     them (into a smaller row bucket), which changes no token;
  4. host: detokenise.

A call first makes the rollout layout (`layout.LayoutCopy`): the parameters in the compute dtype,
the text layers as separate buffers, and on a mesh placed on `sharding.inference_mesh`
(tensor-parallel over `tensor_parallel` devices, replicated over the rest, where rows are split),
so no weight is gathered inside the decode loop; the copy lives for the call. Outputs come back
on the trainer's mesh, rows over (data, fsdp).

Dimensions (the package alphabet): B prompts · G samples per prompt · T prompt bucket · R new-token
bucket · V vocab · P vision patches.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from robot_r1_jax.model import packing, processor, rope, sharding
from robot_r1_jax.model.qwen2_5_vl import Qwen25VL
from robot_r1_jax.model.text import KVCache
from robot_r1_jax.model.vision import Grid
from robot_r1_jax.generate import layout, sampling
from robot_r1_jax.generate.batching import (TraceCounter, bucket, host_rows, left_pad, per_prompt,
                                           whole_groups)

if TYPE_CHECKING:
  from transformers import PreTrainedTokenizerBase


class FinishReason(enum.IntEnum):
  STOP = 0  # emitted a stop token (kept as the completion's last token)
  LENGTH = 1  # reached max_new_tokens


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """What to generate. Static: changing a field compiles a new program.

  stop_tokens: ids that end a completion (for Qwen: `<|im_end|>` and `<|endoftext|>`).
  sampling: temperature / top-p / top-k / greedy.
  num_samples: G completions per prompt.
  prompt_buckets, new_token_buckets: increasing lengths that prompts and `max_new_tokens` are
    rounded up to.
  pad_id: fills the completion after its end (masked out everywhere).
  chunk_prompts: prompts (over all processes) per prefill + decode loop; a larger call runs
    chunk after chunk, so one chunk's KV cache is alive at a time. 0: the whole call at once.
  tensor_parallel: devices each parameter copy of the rollout layout is split over; 0: as many
    as the model has K/V heads (each device holds one head's cache), where the devices allow.
  compact_every: decode in segments of this many tokens and, between segments, drop the finished
    rows (the live ones move into the smallest row bucket that holds them: B·G, B·G/2, B·G/4, …
    rows, each a multiple of the layout's data-parallel groups), so finished rows stop costing;
    the same tokens as one loop (per-row keys). 0: one loop over every row until the last ends.
  pack_prompts: the prefill's matmuls run on the prompts' real tokens only, packed shard by
    shard (`model.packing`; a handful of row counts per prompt bucket, each compiled once);
    False: on every padded slot.
  """

  stop_tokens: tuple[int, ...]
  sampling: sampling.SamplingParams = sampling.SamplingParams()
  num_samples: int = 1
  prompt_buckets: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096)
  new_token_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
  pad_id: int = 0
  chunk_prompts: int = 0
  tensor_parallel: int = 0
  compact_every: int = 0
  pack_prompts: bool = True

  def __post_init__(self):
    if self.num_samples < 1:
      raise ValueError(f"num_samples={self.num_samples} must be >= 1")
    if self.chunk_prompts < 0:
      raise ValueError(f"chunk_prompts={self.chunk_prompts} must be >= 0 (0: no chunks)")
    if self.compact_every < 0:
      raise ValueError(f"compact_every={self.compact_every} must be >= 0 (0: no compaction)")
    if self.tensor_parallel < 0:
      raise ValueError(f"tensor_parallel={self.tensor_parallel} must be >= 0 (0: derived)")
    for name in ("prompt_buckets", "new_token_buckets"):
      buckets = getattr(self, name)
      if not buckets or buckets[0] < 1 or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"{name}={buckets} must be a non-empty, strictly increasing tuple of "
                         "positive lengths")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
  """What the prefill hands to the decode loop: B·G rows, row b·G + g sampling prompt b."""

  cache: KVCache  # B·G rows of R empty slots, continuing their prompt's T (its shared prefix)
  logits: jax.Array  # [B·G, V] f32: next-token logits after the prompt
  rope_deltas: jax.Array  # [B·G] int32
  prompt_tokens: jax.Array  # [B·G, T] int32, left-padded
  prompt_mask: jax.Array  # [B·G, T] bool
  prompt_index: jax.Array  # [B·G] int32: the row's prompt's index in the call (its sampling key)



@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
  """B·G completions; row b·G + g is sample g of prompt b.

  `prompt_tokens`/`prompt_mask` followed by `tokens`/`mask` is the full sequence the trainer scores:
  a fresh forward over it gives, at each completion token, `log_probs` (see `sampling`).
  """

  tokens: jax.Array  # [B·G, R] int32; `pad_id` after the end
  mask: jax.Array  # [B·G, R] bool: the first `lengths` tokens (the stop token included)
  log_probs: jax.Array  # [B·G, R] f32 sampling log-probs of `tokens`; 0 where not `mask`
  lengths: jax.Array  # [B·G] int32
  finish_reasons: jax.Array  # [B·G] int32 `FinishReason` values
  prompt_tokens: jax.Array  # [B·G, T] int32, left-padded to the prompt bucket
  prompt_mask: jax.Array  # [B·G, T] bool
  # B·G detokenised completions when the sampler has a tokenizer (static: not an array).
  text: tuple[str, ...] = dataclasses.field(default=(), metadata=dict(static=True))



@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _RowInputs:
  """Per-row constants of the decode loop."""

  keys: jax.Array  # [B·G] sampling keys (see `sampling.row_keys`)
  prompt_index: jax.Array  # [B·G] int32: each row's prompt (rows move when compacted)
  num_real: jax.Array  # [B·G] int32: real prompt tokens
  rope_deltas: jax.Array  # [B·G] int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Loop:
  """The decode loop's carry."""

  step: jax.Array  # [] int32: the completion position chosen next
  cache: KVCache
  tokens: jax.Array  # [B·G, R] int32
  log_probs: jax.Array  # [B·G, R] f32
  lengths: jax.Array  # [B·G] int32
  done: jax.Array  # [B·G] bool: the row has emitted a stop token



class Sampler:
  """Generates G completions per prompt with a Qwen2.5-VL model (see the module docstring).

  The model's current parameters are read at every call, so a trainer that updates the model in
  place samples from the latest policy without recompiling. `mesh` is the trainer's: outputs are
  placed on it; the prefill and decode loop run on `layout`, its devices as the rollout layout.
  """

  def __init__(self, model: Qwen25VL, config: SamplerConfig, *, mesh: Mesh | None = None,
               tokenizer: PreTrainedTokenizerBase | None = None):
    self.model, self.config, self.mesh, self.tokenizer = model, config, mesh, tokenizer
    self.traces = TraceCounter()
    self.layout = None if mesh is None else sharding.inference_mesh(
        mesh, layout.tensor_parallel(config.tensor_parallel, model, mesh))
    self.layout_copy = layout.LayoutCopy(model, self.layout)
    self._graphdef = self.layout_copy.graphdef  # the programs below run on the layout
    self.prefill_step = jax.jit(self.traces.wrap("prefill", self._prefill_impl),
                            static_argnames=("grid", "new_bucket", "packed_rows"))
    self.decode_loop = jax.jit(self.traces.wrap("decode", self._decode_impl),
                           donate_argnames=("cache",))
    # The segmented decode (compact_every): one program per row bucket for each of these.
    self.start_step = jax.jit(self.traces.wrap("start", self._start_impl),
                              donate_argnames=("cache",))  # aliased into the carry
    self.segment_step = jax.jit(self.traces.wrap("segment", self._segment_impl),
                                donate_argnames=("loop",))
    # Not donated: the smaller carry cannot reuse the larger one's buffers (freed when dropped).
    self.gather_step = jax.jit(self.traces.wrap("gather", self._gather_impl))
    self.scatter_step = jax.jit(self.traces.wrap("scatter", self._scatter_impl),
                                donate_argnames=("full",))

  # -------------------------------------------------------------------------------------------
  # Host side.

  def __call__(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray, key: jax.Array, *,
               max_new_tokens: int, pixel_values: jax.Array | np.ndarray | None = None,
               image_grid_thw: Sequence[Sequence[int]] | np.ndarray | None = None,
               prompt_index: Sequence[int] | np.ndarray | None = None) -> SamplerOutput:
    """Samples `num_samples` completions of up to `max_new_tokens` tokens for every prompt.

    Args:
      prompt_ids: [B, T'] left-padded prompt ids (images as runs of `<|image_pad|>`).
      prompt_mask: [B, T'] 1 for real tokens.
      key: PRNG key; equal keys and inputs give equal completions.
      max_new_tokens: completion budget; rounded up to a new-token bucket for shapes only.
      pixel_values: [P, patch_dim] patches of every image in prompt order (processor output).
      image_grid_thw: the images' (t, h, w) grids, in the same order.
      prompt_index: [B] each prompt's index, which with `key` decides its samples (default: its
        position in the call, over all processes). A prompt given the same index samples the
        same completions whatever else is in the call.
    """
    index = self._prompt_index(len(prompt_ids), prompt_index)
    chunks = self._chunks(len(prompt_ids), pixel_values, image_grid_thw)
    params = self.layout_params()  # once per call, for every chunk
    if chunks is None:
      outs = [self.decode(self.prefill(prompt_ids, prompt_mask, pixel_values, image_grid_thw,
                                       max_new_tokens=max_new_tokens, params=params,
                                       prompt_index=index),
                          key, max_new_tokens, params=params)]
    else:
      ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
      outs = [self.decode(self.prefill(ids[rows], mask[rows], pixels, grid,
                                       max_new_tokens=max_new_tokens, params=params,
                                       prompt_index=index[rows]),
                          key, max_new_tokens, params=params)
              for rows, pixels, grid in chunks]
    del params
    out = jax.tree.map(self._concat_rows, *outs)
    if self.tokenizer is None:
      return out
    end = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
           else self.tokenizer.eos_token_id)
    # Past each row's end the ids are padding; mapping them to the tokenizer's own end id makes
    # `decode_completions` cut there even when `pad_id` is an ordinary token.
    tokens = np.where(sharding.local_rows(out.mask), sharding.local_rows(out.tokens), end)
    return dataclasses.replace(out, text=tuple(processor.decode_completions(self.tokenizer,
                                                                            tokens)))

  @staticmethod
  def _prompt_index(prompts: int, given: Sequence[int] | np.ndarray | None) -> np.ndarray:
    if given is None:  # the position in the global batch, which stacks the processes' prompts
      return np.arange(prompts, dtype=np.int32) + jax.process_index() * prompts
    index = np.asarray(given)
    if index.shape != (prompts,) or not np.issubdtype(index.dtype, np.integer):
      raise ValueError(f"prompt_index must be {prompts} integers, one per prompt; got "
                       f"{index.dtype} {list(index.shape)}")
    return index.astype(np.int32)

  def _chunks(self, prompts: int, pixel_values, image_grid_thw
              ) -> list[tuple[slice, np.ndarray | None, np.ndarray | None]] | None:
    """This process's (rows, their pixels, their grids) per chunk; None for one chunk."""
    per = self.config.chunk_prompts // jax.process_count()
    if not self.config.chunk_prompts or per >= prompts:
      return None
    if self.config.chunk_prompts % jax.process_count() or prompts % per:
      raise ValueError(f"{prompts * jax.process_count()} prompts do not split into chunks of "
                       f"chunk_prompts={self.config.chunk_prompts} over "
                       f"{jax.process_count()} process(es)")
    if pixel_values is None:
      return [(slice(i, i + per), None, None) for i in range(0, prompts, per)]
    grids = np.asarray(image_grid_thw).reshape(-1, 3)
    pixels = per_prompt(pixel_values, tuple(map(tuple, grids.tolist())), prompts, "in chunks")
    return [(slice(i, i + per), pixels[i:i + per].reshape(-1, pixels.shape[-1]), grids[i:i + per])
            for i in range(0, prompts, per)]

  def _concat_rows(self, *chunks: jax.Array) -> jax.Array:
    """Chunks' outputs (on the layout) → one on the trainer's mesh, in this process's row order
    (off a mesh, one concatenation)."""
    if self.mesh is None:
      return chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks)
    # Each process stacks its own rows of every chunk, so its rows stay those of its prompts.
    return sharding.global_rows(np.concatenate([sharding.local_rows(c) for c in chunks]),
                                self.mesh)

  def layout_params(self) -> nnx.State:
    """The model's current parameters in the rollout layout (a new copy; see the class)."""
    return self.layout_copy(nnx.state(self.model))

  def prefill(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray,
              pixel_values: jax.Array | np.ndarray | None = None,
              image_grid_thw: Sequence[Sequence[int]] | np.ndarray | None = None, *,
              max_new_tokens: int, params: nnx.State | None = None,
              prompt_index: np.ndarray | None = None) -> DecodeState:
    """Buckets and places the prompts, then runs the compiled prefill (one forward per prompt)
    with `params` (default: a fresh `layout_params()`); `prompt_index`: see `__call__`."""
    cfg = self.config
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    new_bucket = bucket(max_new_tokens, cfg.new_token_buckets, "max_new_tokens")
    length = np.shape(prompt_ids)[-1]
    if jax.process_count() > 1:  # every process must build the same global shape
      length = int(np.max(multihost_utils.process_allgather(np.int32(length))))
    length = bucket(length, cfg.prompt_buckets, "prompt length")
    ids, mask = left_pad(prompt_ids, prompt_mask, length, cfg.pad_id)
    index = self._prompt_index(len(ids), prompt_index)
    if (pixel_values is None) != (image_grid_thw is None):
      raise ValueError("pixel_values and image_grid_thw must be given together")
    grid = None if image_grid_thw is None else tuple(
        tuple(int(x) for x in g) for g in np.asarray(image_grid_thw).reshape(-1, 3))
    shards = self._shards()
    if ids.shape[0] * jax.process_count() % shards:
      raise ValueError(f"{ids.shape[0] * jax.process_count()} prompts do not split over the "
                       f"rollout layout's {shards} data-parallel groups; use a multiple")
    packed_rows = packing.rows_for(mask, shards) if cfg.pack_prompts else None
    if self.layout is not None:
      # Each process feeds its own prompts (its loader shard); the global batch stacks them.
      ids, mask, index = (sharding.global_rows(x, self.layout) for x in (ids, mask, index))
      if pixel_values is not None:
        pixel_values, grid = self._global_images(np.asarray(pixel_values), grid, len(prompt_ids))
    with sharding.on_mesh(self.layout):
      return self.prefill_step(self.layout_params() if params is None else params, ids, mask,
                               index, pixel_values, grid=grid, new_bucket=new_bucket,
                               packed_rows=packed_rows)

  def _shards(self) -> int:
    """The rollout layout's row groups (1 off a mesh)."""
    return self.layout.shape["data"] if self.layout is not None else 1

  def _global_images(self, pixel_values: np.ndarray, grid: Grid, prompts: int
                     ) -> tuple[jax.Array, Grid]:
    """One image per prompt, placed like its prompt's row; the grid of the global batch."""
    placed = sharding.global_rows(per_prompt(pixel_values, grid, prompts, "on a mesh"),
                                  self.layout)
    return placed.reshape(-1, placed.shape[-1]), grid * jax.process_count()

  def decode(self, state: DecodeState, key: jax.Array, max_new_tokens: int,
             params: nnx.State | None = None) -> SamplerOutput:
    """Runs the compiled decode loop on a prefill's state with `params` (default: a fresh
    `layout_params()`); `state.cache` is donated (consumed). Rows stay on the layout."""
    room = state.cache.length
    if not 1 <= max_new_tokens <= room:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be in [1, {room}], the new-token "
                       "bucket this state was prefilled for")
    rest = dataclasses.replace(state, cache=None)
    params = self.layout_params() if params is None else params
    with sharding.on_mesh(self.layout):
      if self.config.compact_every:
        return self._decode_compacting(params, state.cache, rest, key, max_new_tokens)
      out, _ = self.decode_loop(params, state.cache, rest, key, jnp.int32(max_new_tokens))
    return out

  def _decode_compacting(self, params: nnx.State, cache: KVCache, state: DecodeState,
                         key: jax.Array, max_new_tokens: int) -> SamplerOutput:
    """Segments of `compact_every` tokens; between them the live rows move into a smaller row
    bucket when they fit one, and the finished rows' results into full-size buffers."""
    loop, inputs = self.start_step(cache, state, key)
    full = None  # the results of every original row, once rows have moved
    total = rows = loop.done.shape[0]
    groups = self._shards()
    origin = np.arange(total)  # the original row of each current row
    step = 1
    while True:
      limit = min(step + self.config.compact_every, max_new_tokens)
      loop = self.segment_step(params, loop, inputs, jnp.int32(limit))
      done = host_rows(loop.done)
      step = int(np.asarray(loop.step.addressable_data(0)))  # replicated: any device has it
      if step >= max_new_tokens or done.all():
        break
      live = np.flatnonzero(~done)
      size = rows
      while size % 2 == 0 and (size // 2) % groups == 0 and size // 2 >= len(live):
        size //= 2
      if size == rows:
        continue
      if full is None:  # copies: the carry's own buffers are donated to the next program
        full = tuple(jnp.copy(x) for x in (loop.tokens, loop.log_probs, loop.lengths, loop.done))
      else:
        full = self.scatter_step(full, loop, self._replicated(origin))
      prompts = whole_groups(done, size, loop.cache.rows_per_prefix, groups)
      if prompts is None:
        # Fill the bucket with copies of a finished row: done, so they draw nothing.
        keep = np.concatenate([live, np.full(size - len(live), np.flatnonzero(done)[0])])
      else:
        keep = (prompts[:, None] * loop.cache.rows_per_prefix +
                np.arange(loop.cache.rows_per_prefix)).reshape(-1)
        prompts = self._replicated(prompts)
      loop, inputs = self.gather_step(loop, inputs, self._replicated(keep), prompts)
      origin, rows = origin[keep], size
    full = ((loop.tokens, loop.log_probs, loop.lengths, loop.done) if full is None else
            self.scatter_step(full, loop, self._replicated(origin)))
    return self._output(state, *full)

  def _replicated(self, x: np.ndarray) -> jax.Array:
    """A host index array, the same on every device (on the layout when there is one)."""
    x = jnp.asarray(x, jnp.int32)
    if self.layout is None:
      return x
    return jax.device_put(x, jax.sharding.NamedSharding(self.layout,
                                                        jax.sharding.PartitionSpec()))

  def _cache_rows(self, x: jax.Array, axis: int) -> jax.Array:
    """Pins a cache buffer's rows (`axis`) to the batch axes and its K/V heads (next) to tensor,
    as the K/V projections place them."""
    names = [None] * x.ndim
    names[axis] = "batch"
    if x.ndim > 2:  # keys/values; `valid` is [B, S]
      names[axis + 1] = "kv_heads"
    return sharding.constrain(x, names)

  def _rows(self, x: jax.Array, axis: int = 0) -> jax.Array:
    """Pins the B·G axis of `x` to (data, fsdp) when sampling on a mesh (`sharding.on_mesh`)."""
    names = [None] * x.ndim
    names[axis] = "batch"
    return sharding.constrain(x, names)

  # -------------------------------------------------------------------------------------------
  # Compiled side.

  def _prefill_impl(self, params: nnx.State, ids: jax.Array, mask: jax.Array,
                    prompt_index: jax.Array, pixel_values: jax.Array | None, *, grid: Grid | None,
                    new_bucket: int, packed_rows: int | None = None) -> DecodeState:
    model = nnx.merge(self._graphdef, params)
    b, t = ids.shape
    packed = (None if packed_rows is None else
              packing.Packed.of(mask.astype(bool), self._shards(), packed_rows))
    # Only the last position's logits are needed: skips a [B, T, V] head output.
    out = model.prefill(ids, mask, pixel_values, grid, cache_length=t, logits_from=t - 1,
                        packed=packed)
    g = self.config.num_samples
    # One prefill per prompt; its G samples (adjacent rows) continue its cache, held once.
    rep = lambda x, axis=0: self._rows(jnp.repeat(x, g, axis=axis), axis)
    cache = out.cache.continued(g, new_bucket).map_rows(self._cache_rows)
    # Left padding puts every prompt's last real token in the last slot.
    return DecodeState(cache=cache, logits=rep(out.logits[:, 0].astype(jnp.float32)),
                       rope_deltas=rep(out.rope_deltas), prompt_tokens=rep(ids),
                       prompt_mask=rep(mask), prompt_index=rep(prompt_index))

  def _decode_impl(self, params: nnx.State, cache: KVCache, state: DecodeState, key: jax.Array,
                   max_new_tokens: jax.Array) -> tuple[SamplerOutput, KVCache]:
    loop, rows = self._start_impl(cache, state, key)
    loop = self._segment_impl(params, loop, rows, max_new_tokens)
    out = self._output(state, loop.tokens, loop.log_probs, loop.lengths, loop.done)
    # Returning the cache lets XLA alias it to the donated input buffer.
    return out, loop.cache

  def _start_impl(self, cache: KVCache, state: DecodeState, key: jax.Array
                  ) -> tuple[_Loop, _RowInputs]:
    """The loop's carry after the first token (chosen from the prefill's logits)."""
    rows = state.logits.shape[0]
    new_bucket = cache.length
    inputs = _RowInputs(keys=sampling.row_keys(key, state.prompt_index, self.config.num_samples),
                        prompt_index=state.prompt_index,
                        num_real=state.prompt_mask.sum(axis=1, dtype=jnp.int32),
                        rope_deltas=state.rope_deltas)
    pad = self.config.pad_id
    start = _Loop(step=jnp.zeros((), jnp.int32), cache=cache,
                  tokens=self._rows(jnp.full((rows, new_bucket), pad, jnp.int32)),
                  log_probs=self._rows(jnp.zeros((rows, new_bucket), jnp.float32)),
                  lengths=self._rows(jnp.zeros((rows,), jnp.int32)),
                  done=self._rows(jnp.zeros((rows,), bool)))
    return self._record(start, state.logits, inputs), inputs

  def _record(self, loop: _Loop, logits: jax.Array, inputs: _RowInputs) -> _Loop:
    """Chooses token `loop.step` of every row from its next-token logits [B·G, V]."""
    cfg = self.config
    keys = jax.vmap(jax.random.fold_in, (0, None))(inputs.keys, loop.step)
    # The LM head leaves V split over the layout's tensor axis: the draw keeps its blocks there.
    parts = self.layout.shape["tensor"] if self.layout is not None else 1
    choice = sampling.choose(logits, keys, cfg.sampling, parts)
    active = ~loop.done
    token = jnp.where(active, choice.tokens, cfg.pad_id)
    log_prob = jnp.where(active, choice.log_probs, 0.0)
    put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x[:, None], loop.step, axis=1)
    stop_tokens = jnp.asarray(cfg.stop_tokens, jnp.int32)
    return _Loop(step=loop.step + 1, cache=loop.cache, tokens=put(loop.tokens, token),
                 log_probs=put(loop.log_probs, log_prob),
                 lengths=loop.lengths + active.astype(jnp.int32),
                 done=loop.done | (active & jnp.isin(token, stop_tokens)))

  def _segment_impl(self, params: nnx.State, loop: _Loop, inputs: _RowInputs,
                    limit: jax.Array) -> _Loop:
    """Decodes until token `limit` or until every row is done."""
    model = nnx.merge(self._graphdef, params)
    # Layers unrolled on the layout's per-layer weights and the prefill's per-layer cache buffers
    # (no copy): a scan over stacked ones would copy every layer's weights and cache per step.
    layers = model.decode_layers()

    def step(loop: _Loop) -> _Loop:
      # Feed back the previous token: it is real token `num_real + step - 1` of its row.
      previous = jax.lax.dynamic_slice_in_dim(loop.tokens, loop.step - 1, 1, axis=1)
      out = model.decode_step(previous, loop.cache, rope.decode_positions(
          inputs.num_real + loop.step - 1, inputs.rope_deltas), layers=layers)
      return self._record(dataclasses.replace(loop, cache=out.cache), out.logits[:, 0], inputs)

    return jax.lax.while_loop(lambda loop: (loop.step < limit) & ~jnp.all(loop.done), step, loop)

  def _output(self, state: DecodeState, tokens: jax.Array, log_probs: jax.Array,
              lengths: jax.Array, done: jax.Array) -> SamplerOutput:
    mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    reasons = jnp.where(done, FinishReason.STOP, FinishReason.LENGTH).astype(jnp.int32)
    return SamplerOutput(tokens=tokens, mask=mask, log_probs=log_probs, lengths=lengths,
                         finish_reasons=reasons, prompt_tokens=state.prompt_tokens,
                         prompt_mask=state.prompt_mask)

  def _gather_impl(self, loop: _Loop, inputs: _RowInputs, rows: jax.Array,
                   prompts: jax.Array | None) -> tuple[_Loop, _RowInputs]:
    """The carry of `rows` only (compaction): every per-row leaf, the cache's included. The
    cache's shared prompts keep rows `prompts` when `rows` are their whole groups, else (None)
    each row takes its own copy of its prompt's."""
    take = lambda x, axis=0: self._rows(jnp.take(x, rows, axis=axis), axis)
    if prompts is None:
      prompts = rows // loop.cache.rows_per_prefix
    cache = loop.cache.map_rows(
        lambda x, axis: self._cache_rows(jnp.take(x, rows, axis=axis), axis),
        lambda x, axis: self._cache_rows(jnp.take(x, prompts, axis=axis), axis))
    rest = jax.tree.map(take, dataclasses.replace(loop, step=None, cache=None))
    return (dataclasses.replace(rest, step=loop.step, cache=cache),
            jax.tree.map(take, inputs))

  def _scatter_impl(self, full: tuple[jax.Array, ...], loop: _Loop, origin: jax.Array
                    ) -> tuple[jax.Array, ...]:
    """Writes the compact rows' tokens, log-probs, lengths and flags to their original rows."""
    return tuple(self._rows(f.at[origin].set(x)) for f, x in
                 zip(full, (loop.tokens, loop.log_probs, loop.lengths, loop.done)))
