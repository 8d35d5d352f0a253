"""Scoring completions: per-token log-probabilities and entropy of prompt + completion rows.

Every stage that trains on completions scores them here: SFT (its targets), the RL step (policy,
old and reference log-probs). Positions are the ones the sampler decoded with (the prompt's M-RoPE
index, then one step per completion token), so a generated `<|image_pad|>` id is never mistaken
for an image and SFT trains exactly the distribution the sampler draws from.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from robot_r1_jax.model import packing, rope, sharding
from robot_r1_jax.model.qwen2_5_vl import Qwen25VL


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sequences:
  """Prompt + completion rows scored by a forward pass (row-major over B·G)."""

  prompt_ids: jax.Array  # [B, T] int32, left-padded
  prompt_mask: jax.Array  # [B, T] int32
  completion: jax.Array  # [B, R] int32
  completion_mask: jax.Array  # [B, R] int32 (a prefix of each row)
  pixel_values: jax.Array | None  # [B, P, 1176] f32: each row's image, or None


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log π(target) at each position: logits [B, R, V], integer targets [B, R] → [B, R] f32.

  The log-softmax is taken in fp32 whatever the logits dtype (DESIGN.md numerics), but only its
  [B, R] normaliser is formed: the upcast, max and exp-sum fuse into reductions under jit, and the
  target logit is gathered from the original array (a bf16 → f32 cast is exact). No [B, R, V] fp32
  array beyond the upcast input is materialised (see the memory test). With V split over devices
  (`head_scores`) the partitioner takes each device's part of the target's logit and sums the
  parts: no logits move.
  """
  if logits.shape[:-1] != targets.shape:
    raise ValueError(f"logits {logits.shape} and targets {targets.shape} disagree on [B, R]")
  # fp32: a bf16 logsumexp over a 150K vocabulary loses ~2 significant digits.
  normaliser = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked.astype(jnp.float32) - normaliser


def token_entropy(logits: jax.Array) -> jax.Array:
  """Entropy of the next-token distribution at each position: logits [B, R, V] → [B, R] f32."""
  logits = logits.astype(jnp.float32)  # fp32 softmax, as for the log-probs.
  log_p = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  p = jnp.exp(log_p)
  # A vocabulary entry masked to −inf has p = 0 and log p = −inf, and 0·(−inf) is nan. Replacing
  # log p (not the product) keeps the gradient finite too.
  return -(p * jnp.where(p > 0, log_p, 0.0)).sum(axis=-1)


# Completion positions scored per application of the LM head: [rows, 256, V] f32 logits live at
# a time (V = 152064: 156 MB per row) instead of [rows, R, V].
LOGITS_CHUNK = 256


def sequence_log_probs(model: Qwen25VL, seqs: Sequences, image_grid: tuple[int, int, int] | None,
                       temperature: float = 1.0, share: int = 1, chunk: int = LOGITS_CHUNK,
                       entropy_grad: bool = False, packed_rows: int | None = None
                       ) -> tuple[jax.Array, jax.Array]:
  """(log-probs [B, R] f32 of the completion tokens, entropy [B, R] f32) under `model`; the
  entropy carries no gradient unless `entropy_grad` (an entropy bonus in the loss).

  The distribution is softmax(logits / temperature), the one the sampler drew from, so that the
  policy, old and reference log-probs and the sampler's own all describe the same policy.

  `share`: rows come in runs of `share` that hold one prompt and image (samples of one prompt,
  kept adjacent). Each run's prompt and image then go through the model once and its completions
  attend to that prompt's keys and values: the same numbers as scoring every row whole, up to
  float rounding, for 1/share of the prompt's FLOPs. `share=1` is the single whole-row forward
  (the pass compared against Hugging Face).

  `packed_rows` (`packed_rows_for`): the completions' real tokens packed into that many rows per
  batch shard (`model.packing`), so that their matmuls and the LM head cost the tokens generated,
  not the longest completion's width in every row. The completions then follow their prompt's
  pass as with `share` > 1 (with `share=1`, one prompt pass per row: the whole-row forward's
  FLOPs), and positions past a row's completion score 0 (the loss masks them either way).

  The LM head runs on `chunk` positions at a time (`head_scores`): no [B, R, V] array is formed.
  """
  if seqs.prompt_ids.shape[0] % share:
    raise ValueError(f"{seqs.prompt_ids.shape[0]} rows do not come in runs of share={share}")
  head, axes = model.head_weight()
  score = lambda hidden, targets: head_scores(head, hidden, targets, temperature, chunk, axes)
  if share == 1 and packed_rows is None:
    logp, entropy = score(_whole_row_hidden(model, seqs, image_grid), seqs.completion)
  else:
    logp, entropy = _shared_prompt_scores(model, seqs, image_grid, share, score, packed_rows)
  return logp, entropy if entropy_grad else jax.lax.stop_gradient(entropy)


def packed_rows_for(completion_mask: jax.Array, shards: int, counts: int) -> int | None:
  """`packed_rows` for `sequence_log_probs` on every micro-batch of `completion_mask` [M, rows,
  R] (or [rows, R]) split over `shards` batch shards: the most real tokens of the completions'
  chunks (all but the last position) in any shard of any micro-batch, rounded up to one of
  `counts` steps (`packing.rounded`); None when packing saves no row."""
  chunk = completion_mask[..., :-1]
  if chunk.shape[-1] == 0:
    return None
  per_shard = chunk.reshape(-1, shards, chunk.shape[-2] // shards * chunk.shape[-1])
  most = int(jnp.max(jnp.sum(per_shard, axis=-1, dtype=jnp.int32)))
  return packing.rounded(most, per_shard.shape[-1], counts)


def head_scores(head: jax.Array, hidden: jax.Array, targets: jax.Array, temperature: float = 1.0,
                chunk: int = LOGITS_CHUNK, head_axes: str = "DV") -> tuple[jax.Array, jax.Array]:
  """(log π(target), entropy), each [B, R] f32, from hidden states [B, R, D] through the LM head
  (`Qwen25VL.head_weight()`: [D, V] for `head_axes` "DV", [V, D] for "VD"), `chunk` positions
  at a time.

  Chunks run in a `lax.map` whose body is rematerialised: the backward pass recomputes one
  chunk's logits at a time from its hidden states, so neither pass holds more than [B, chunk, V].

  On a mesh the head is split over the vocabulary across every device once, before the loop
  (`vocab_split`), and each chunk's hidden states are gathered to every device: a chunk moves its
  [B, chunk, D] hidden states and [B, chunk] softmax sums, where the FSDP head would be gathered
  whole (1 GiB at 7B) and its gradient reduced in every chunk. The head's gradient stays split
  until the loop ends.
  """
  b, r = hidden.shape[:2]
  if targets.shape != (b, r):
    raise ValueError(f"hidden {hidden.shape} and targets {targets.shape} disagree on [B, R]")
  # Split from the parameter's own placement: the transpose of these pins takes the head's
  # gradient back to it after the loop, so that the optimizer updates the head where it lives
  # (left to the partitioner, the vocabulary-split gradient pulled the head's Adam update into
  # that layout, three resharded copies of the f32 head).
  head = sharding.constrain(head, tuple({"D": "embed", "V": "vocab"}[a] for a in head_axes))
  head = sharding.constrain(head, tuple("vocab_split" if a == "V" else None for a in head_axes))

  def scores(h, t):
    # Every row to every device, from each device's own rows: pinning both ends keeps the
    # reduction of the hidden states' gradient inside the loop (else every row's [B, R, D]
    # gradient builds up on every device and is reduced once after it).
    h = sharding.constrain(sharding.constrain(h, ("batch", None, None)), (None, None, None))
    logits = sharding.constrain(jnp.einsum(f"BTD,{head_axes}->BTV", h, head),
                                (None, None, "vocab_split"))
    return tuple(sharding.constrain(x, ("batch", None))
                 for x in _logits_scores(logits, t, temperature))

  if r <= chunk:
    return scores(hidden, targets)
  n = -(-r // chunk)
  split = lambda x: jnp.pad(x, [(0, 0), (0, n * chunk - r)] + [(0, 0)] * (x.ndim - 2)).reshape(
      (b, n, chunk) + x.shape[2:]).swapaxes(0, 1)  # [n, B, chunk, …]
  out = jax.lax.map(jax.checkpoint(lambda args: scores(*args)), (split(hidden), split(targets)))
  return tuple(x.swapaxes(0, 1).reshape(b, n * chunk)[:, :r] for x in out)


def _logits_scores(logits: jax.Array, targets: jax.Array, temperature: float
                   ) -> tuple[jax.Array, jax.Array]:
  if temperature != 1.0:
    logits = logits.astype(jnp.float32) / temperature
  return token_log_probs(logits, targets), token_entropy(logits)


def _whole_row_hidden(model: Qwen25VL, seqs: Sequences, image_grid: tuple[int, int, int] | None
                      ) -> jax.Array:
  """[B, R, D]: one forward over every prompt + completion row, the hidden states that predict
  the completion tokens."""
  prompt_len, r = seqs.prompt_ids.shape[1], seqs.completion.shape[1]
  cfg = model.cfg
  grids = None if image_grid is None else (image_grid,) * seqs.prompt_ids.shape[0]
  index = rope.get_rope_index(seqs.prompt_ids, seqs.prompt_mask, grids,
                              image_token_id=cfg.image_token_id,
                              spatial_merge_size=cfg.vision.spatial_merge_size)
  completion_pos = rope.decode_positions(seqs.prompt_mask.sum(1).astype(jnp.int32), index.deltas,
                                         r)
  positions = jnp.concatenate([index.positions, completion_pos], axis=2)
  ids = jnp.concatenate([seqs.prompt_ids, seqs.completion], axis=1)
  mask = jnp.concatenate([seqs.prompt_mask, seqs.completion_mask], axis=1)
  pixels = None if seqs.pixel_values is None else seqs.pixel_values.reshape(
      -1, seqs.pixel_values.shape[-1])
  # Position t predicts token t+1: the completion is predicted from [T−1, T+R−1).
  image_mask = jnp.concatenate([seqs.prompt_ids == cfg.image_token_id,
                                jnp.zeros(seqs.completion.shape, bool)], axis=1)
  return model.forward(ids[:, :-1], mask[:, :-1], pixels, grids, positions=positions[:, :, :-1],
                       logits_from=prompt_len - 1, image_mask=image_mask[:, :-1],
                       head=False).hidden


def _shared_prompt_scores(model: Qwen25VL, seqs: Sequences,
                          image_grid: tuple[int, int, int] | None, share: int,
                          score: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
                          packed_rows: int | None) -> tuple[jax.Array, jax.Array]:
  """`score` of the hidden states `_whole_row_hidden` gives, each run's prompt through the model
  once and its completions attending to the prompt's keys/values, in one pass over the layers
  (`Qwen25VL.with_prompt`); with `packed_rows`, the completions packed."""
  t, r = seqs.prompt_ids.shape[1], seqs.completion.shape[1]
  ids, mask = seqs.prompt_ids[::share], seqs.prompt_mask[::share]
  grids = None if image_grid is None else (image_grid,) * ids.shape[0]
  pixels = None if seqs.pixel_values is None else seqs.pixel_values[::share].reshape(
      -1, seqs.pixel_values.shape[-1])
  rep = lambda x: jnp.repeat(x, share, axis=0)
  # Position t predicts token t+1: the last prompt position predicts completion token 0, and the
  # completion's positions [0, R−1) the rest.
  if r == 1:
    return score(rep(model.forward(ids, mask, pixels, grids, logits_from=t - 1,
                                   head=False).hidden), seqs.completion)
  chunk_mask = seqs.completion_mask[:, :-1].astype(bool)
  packed = None if packed_rows is None else packing.Packed.of(
      chunk_mask, sharding.batch_shards(len(chunk_mask)), packed_rows)
  last, hidden = model.with_prompt(ids, mask, pixels, grids, seqs.completion[:, :-1], chunk_mask,
                                   share=share, head=False, packed=packed)
  if packed is None:
    return score(jnp.concatenate([rep(last), hidden], axis=1), seqs.completion)
  # One pass of the head: each shard's rows hold its rows' last prompt positions, then its
  # packed completion positions.
  shards = packed.take.shape[0]
  by_shard = lambda x: x.reshape(shards, -1, *x.shape[2:])  # [B, 1, …] → [S, B/S, …]
  first = len(chunk_mask) // shards
  outs = score(jnp.concatenate([by_shard(rep(last)), hidden], axis=1),
               jnp.concatenate([by_shard(seqs.completion[:, :1]),
                                packed.pack(seqs.completion[:, 1:])], axis=1))
  return tuple(jnp.concatenate([x[:, :first].reshape(-1, 1),
                                jnp.where(chunk_mask, packed.unpack(x[:, first:]), 0.0)], axis=1)
               for x in outs)
