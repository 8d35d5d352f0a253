"""RL step on the `small` preset: update-step FLOP/s ÷ this machine's f32 GEMM FLOP/s, and the
step-time split (rollout / reward / advantage / update), measured in one run.

python bench/train_step.py [--prompts 4 --generations 4 --new_tokens 32 --repeats 3]

Model FLOPs are counted analytically for the pass the learner runs (6·N per token for the matmuls
of fwd+bwd, plus attention scores): each prompt and image once, its G completions after it.
Target: ratio ≥ 0.5.

Then the update on ragged completions (`--spread_width`: half the rows of each group at that
width, half at a quarter of it), with each micro-batch's completions packed into their real tokens
(`LearnerConfig.pack_steps`) and padded to the longest, timed alternately in the same run: packed ÷
padded time, beside the real ÷ padded completion slots (what packing the completions alone could
reach; the prompt pass and attention stay on padded rows).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from robot_r1_jax.data.loader import Batch
from robot_r1_jax.launch import console
from robot_r1_jax.launch import mesh as mesh_lib
from robot_r1_jax.model import config as config_lib
from robot_r1_jax.model import processor, sharding
from robot_r1_jax.model.qwen2_5_vl import init_model
from robot_r1_jax.generate import sampling
from robot_r1_jax.generate.sampler import Sampler, SamplerConfig
from robot_r1_jax.stages.rl_step import Learner, LearnerConfig, TrainRows
from robot_r1_jax.train.scoring import Sequences, packed_rows_for
from robot_r1_jax.train.optim import OptimizerConfig, build_optimizer

from machine import alternating_medians, cpu_model, gemm_flops_per_second


def synthetic_batch(tokenizer, prompts: int, length: int, image_px: int) -> Batch:
  rng = np.random.default_rng(0)
  ids = np.full((prompts, length), tokenizer.pad_token_id, np.int32)
  mask = np.zeros((prompts, length), np.int32)
  pixels, grids = [], []
  words = "Move the gripper towards the red cup and say which option is right: [[A]] [[B]]. "
  for b in range(prompts):
    pv, grid = processor.preprocess_image(
        rng.integers(0, 255, (image_px, image_px, 3), dtype=np.uint8))
    row = processor.build_prompt_ids(tokenizer, words * 6, grid)[-length:]
    ids[b, length - len(row):], mask[b, length - len(row):] = row, 1
    pixels.append(pv)
    grids.append(grid)
  arr = lambda v: np.array([v] * prompts)
  return Batch(input_ids=ids, attention_mask=mask, pixel_values=np.concatenate(pixels),
               image_grid_thw=np.array(grids, np.int32), answers=arr("[[A]]"),
               question_types=arr("movement"), tasks=arr("t"), episodes=arr("e"),
               frames=np.arange(prompts), record_indices=np.arange(prompts),
               epochs=np.zeros(prompts, np.int32), valid=np.ones(prompts, bool))


def build_learner(model, tokenizer, mesh, *, prompts: int, generations: int, micro_batch: int,
                  prompt_length: int, new_tokens: int, top_p: float) -> Learner:
  """A GRPO learner (and its sampler, `learner.sampler`) over one prompt and one new-token
  bucket, sampling at temperature 1 with no stop token, updating `prompts` prompts at a time."""
  sampler = Sampler(model, SamplerConfig(
      stop_tokens=(), num_samples=generations, pad_id=tokenizer.pad_token_id,
      prompt_buckets=(prompt_length,), new_token_buckets=(new_tokens,),
      sampling=sampling.SamplingParams(temperature=1.0, top_p=top_p)), mesh=mesh,
      tokenizer=tokenizer)
  optimizer, _ = build_optimizer(OptimizerConfig(learning_rate=1e-6), total_steps=10)
  return Learner(model, optimizer, sampler, LearnerConfig(
      num_generations=generations, train_batch_size=prompts, micro_batch_size=micro_batch,
      max_new_tokens=new_tokens), mesh)


def analytic_flops(cfg: config_lib.ModelConfig, prompts: int, generations: int, prompt_len: int,
                   new_tokens: int, patches: int) -> float:
  """fwd+bwd FLOPs of one update: each prompt (and its image) once, then its G completions, which
  attend to the prompt and themselves; the LM head only over the completions."""
  t, v = cfg.text, cfg.vision
  rows = prompts * generations
  per_layer = (t.hidden_size * t.head_dim * (t.num_heads * 2 + t.num_kv_heads * 2)
               + 3 * t.hidden_size * t.intermediate_size)
  tokens = prompts * prompt_len + rows * new_tokens
  text = 6 * (tokens * t.num_layers * per_layer + rows * new_tokens * t.hidden_size * t.vocab_size)
  # QK^T and PV over every key (no causal saving), for the prompt pass and the completion chunk.
  scores = prompts * prompt_len**2 + rows * new_tokens * (prompt_len + new_tokens)
  attention = 6 * t.num_layers * 2 * scores * t.hidden_size
  vision_layer = 4 * v.hidden_size**2 + 3 * v.hidden_size * v.intermediate_size
  vision = 6 * prompts * patches * v.depth * vision_layer
  return float(text + attention + vision)


def spread_rows(learner: Learner, batch: Batch, width: int, rng: np.random.Generator
                ) -> TrainRows:
  """One micro-batch [1, B·G, …] of the batch's prompts under random completions, in each group
  half at `width` tokens and half at width / 4, with random advantages."""
  g, mesh = learner.config.num_generations, learner.mesh
  rows = len(batch.input_ids) * g
  lengths = np.where(np.arange(rows) % 2 == 0, width, width // 4)
  mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
  pv = np.asarray(batch.pixel_values, np.float32)
  repeat = lambda x: np.repeat(np.asarray(x), g, axis=0)
  seqs = Sequences(prompt_ids=repeat(batch.input_ids).astype(np.int32),
                   prompt_mask=repeat(batch.attention_mask).astype(np.int32),
                   completion=np.where(mask, rng.integers(100, 1000, mask.shape), 0).astype(
                       np.int32), completion_mask=mask,
                   pixel_values=repeat(pv.reshape(len(batch.input_ids), -1, pv.shape[-1])))
  zeros = np.zeros(mask.shape, np.float32)
  train_rows = TrainRows(seqs=seqs, old_logp=zeros, ref_logp=zeros, rollout_logp=zeros,
                         advantages=rng.normal(size=mask.shape).astype(np.float32))
  return jax.tree.map(lambda x: sharding.global_rows(np.asarray(x)[None], mesh, leading=1),
                      train_rows)


def packed_vs_padded(learner: Learner, batch: Batch, width: int, repeats: int) -> None:
  rows = spread_rows(learner, batch, width, np.random.default_rng(1))
  mask = rows.seqs.completion_mask
  packed = packed_rows_for(mask, sharding.batch_shards(mask.shape[1], learner.mesh),
                           learner.config.pack_steps)
  grid = tuple(int(v) for v in batch.image_grid_thw[0])

  def update(packed_rows):
    with sharding.on_mesh(learner.mesh):
      learner.params, learner.opt_state, _ = learner.train_step(
          learner.params, learner.opt_state, rows, image_grid=grid, on_policy=True,
          packed_rows=packed_rows)
    jax.block_until_ready(learner.params)

  update(None), update(packed)
  padded_s, packed_s = alternating_medians((lambda: update(None), lambda: update(packed)),
                                           repeats)
  slots = int(mask[..., :-1].size)
  print(f"ragged completions ({mask.shape[1]} rows, half at {width} tokens, half at "
        f"{width // 4}), pack_steps={learner.config.pack_steps}: {packed} packed rows for "
        f"{int(mask[..., :-1].sum())} real of {slots} chunk slots")
  print(f"  update padded {padded_s:.2f} s, packed {packed_s:.2f} s: packed/padded = "
        f"{packed_s / padded_s:.2f}   (completion slots real/padded "
        f"{int(mask[..., :-1].sum()) / slots:.2f})")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompts", type=int, default=4)
  parser.add_argument("--generations", type=int, default=4)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--prompt_length", type=int, default=256)
  parser.add_argument("--image_px", type=int, default=112)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--spread_width", type=int, default=128,
                      help="completion width of the ragged-completions update (0: skip it)")
  args = parser.parse_args()
  console.skip_absent_tpu()  # no libtpu probe errors on a host without a TPU

  gemm = gemm_flops_per_second()
  cfg = config_lib.small()
  mesh = mesh_lib.make_mesh("data=1,fsdp=-1,tensor=1")
  model = init_model(cfg, seed=0, mesh=mesh)
  tokenizer = processor.load_tokenizer()
  rows = args.prompts * args.generations
  learner = build_learner(model, tokenizer, mesh, prompts=args.prompts,
                          generations=args.generations, micro_batch=rows,
                          prompt_length=args.prompt_length, new_tokens=args.new_tokens, top_p=1.0)
  batch = synthetic_batch(tokenizer, args.prompts, args.prompt_length, args.image_px)

  start = time.perf_counter()
  learner.step(batch, jax.random.key(0))
  first = time.perf_counter() - start
  splits = [learner.step(batch, jax.random.key(i + 1)).metrics for i in range(args.repeats)]
  phase = lambda k: statistics.median(m[f"time/{k}"] for m in splits)
  update_s = phase("update")
  patches = int(np.prod(batch.image_grid_thw[0]))
  length = args.prompt_length + args.new_tokens
  flops = analytic_flops(cfg, args.prompts, args.generations, args.prompt_length,
                         args.new_tokens, patches)

  print(f"small preset, {rows} sequences × {length} tokens ({patches} patches each), "
        f"{jax.devices()[0].platform}, first step incl. compile {first:.1f} s, CPU: {cpu_model()}")
  print("  step split (median): " + ", ".join(f"{k} {phase(k):.2f} s"
                                              for k in ("rollout", "reward", "advantage",
                                                        "update")))
  print(f"  update step: {flops / 1e9:.1f} GFLOP analytic in {update_s:.2f} s "
        f"= {flops / update_s / 1e9:.1f} GFLOP/s")
  print(f"  machine f32 GEMM: {gemm / 1e9:.1f} GFLOP/s")
  print(f"  ratio update/GEMM = {flops / update_s / gemm:.2f}   (target >= 0.5)")
  if args.spread_width:
    packed_vs_padded(learner, batch, args.spread_width, args.repeats)


if __name__ == "__main__":
  main()
