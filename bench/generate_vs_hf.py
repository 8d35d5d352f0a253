"""Rollout throughput of the JAX sampler ÷ Hugging Face `generate` on the same config (CPU, f32).

python bench/generate_vs_hf.py [--prompts 8 --samples 5 --new-tokens 64 --repeats 3 --text-only
                                --compact-every 8]

The GRPO rollout shape: B prompts of 96–160 text tokens (left-padded) plus one 224×224 image each
(64 image tokens), G samples per prompt at temperature 1.0 and top-p 0.99 (the paper's). Two cases,
each side producing the same tokens per row:
  * equal lengths: every row writes exactly `--new-tokens` tokens (no stop token on our side,
    `min_new_tokens` on Hugging Face's); target ratio ≥ 3;
  * length spread: the rows of every other prompt stop at a quarter of the budget (the stop token
    forced there on both sides, suppressed elsewhere), as a batch of short and long answers; our
    sampler drops finished rows every `--compact-every` tokens; target ratio ≥ 5.
Prints the machine's CPU, median tokens/s (useful tokens: a stopped row's padding does not count)
after a warm-up (the sides alternate, so both see the same background load), the ratios, and the
sampler's compile time separately. Beside each ratio, the ceiling this machine allows: the text
model's weight matmuls alone (`machine.TextMatmuls`) for the least work any sampler must do
(the prefill over the real prompt tokens only, each later token on its still-live rows), timed in
the same run; no sampler can beat Hugging Face by more than that here.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from robot_r1_jax.launch import console
from robot_r1_jax.model import processor
from robot_r1_jax.generate import sampling
from robot_r1_jax.generate.sampler import Sampler, SamplerConfig

from forward_vs_hf import BENCH, hf_twin  # the ≈74M-parameter config (run from the repository root)
from machine import TextMatmuls, cpu_model

TOP_P = 0.99
IMAGE_SIDE = 224
STOP = BENCH.eos_token_id


class SpreadSampler(Sampler):
  """Rows of even-indexed prompts stop at token `short` (the stop token forced); no row stops
  anywhere else (the stop token suppressed)."""

  def __init__(self, *args, short: int, **kwargs):
    super().__init__(*args, **kwargs)
    self.short = short

  def _record(self, loop, logits, inputs):
    stop = jnp.arange(logits.shape[-1]) == STOP
    force = ((inputs.prompt_index % 2 == 0) & (loop.step == self.short - 1))[:, None]
    logits = jnp.where(force, jnp.where(stop, 0.0, -1e9), jnp.where(stop, -1e9, logits))
    return super()._record(loop, logits, inputs)


class SpreadProcessor(transformers.LogitsProcessor):
  """Hugging Face's side of `SpreadSampler` (rows b·G + g of even prompts b)."""

  def __init__(self, prompt_length: int, short: int, samples: int):
    self.prompt_length, self.short, self.samples = prompt_length, short, samples

  def __call__(self, input_ids, scores):
    step = input_ids.shape[1] - self.prompt_length
    force = (torch.arange(scores.shape[0]) // self.samples % 2 == 0) & (step == self.short - 1)
    stop = torch.arange(scores.shape[1]) == STOP
    forced = torch.where(stop, 0.0, -1e9).expand_as(scores)
    return torch.where(force[:, None], forced, scores.masked_fill(stop, -1e9))


def _prompts(rng, b, with_images):
  """Left-padded [B, T] ids/mask; with images, a vision block after a short text prefix, and the
  patches [B·P, 1176] and grids of one random 224² image per prompt."""
  lengths = rng.integers(96, 161, size=b)
  rows, pixels, grids = [], [], []
  for length in lengths:
    text = rng.integers(0, 31990, size=length).tolist()
    if with_images:
      pv, grid = processor.preprocess_image(
          rng.integers(0, 256, size=(IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8))
      block = ([BENCH.vision_start_token_id] + [BENCH.image_token_id] *
               processor.image_token_count(grid) + [BENCH.vision_end_token_id])
      text = text[:8] + block + text[8:]
      pixels.append(pv)
      grids.append(grid)
    rows.append(text)
  ids = np.zeros((b, max(map(len, rows))), np.int64)
  mask = np.zeros_like(ids)
  for row, tokens in enumerate(rows):
    ids[row, ids.shape[1] - len(tokens):] = tokens
    mask[row, ids.shape[1] - len(tokens):] = 1
  if not with_images:
    return ids, mask, None, None
  return ids, mask, np.concatenate(pixels), tuple(grids)


def _seconds(fn) -> tuple[float, float]:
  """(wall, CPU) seconds of fn(); CPU time counts every thread of this process."""
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - wall, time.process_time() - cpu


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--samples", type=int, default=5)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--compact-every", type=int, default=8,
                      help="segment length of the length-spread case's compacting sampler")
  parser.add_argument("--text-only", action="store_true", help="prompts without images")
  args = parser.parse_args()
  console.skip_absent_tpu()  # no libtpu probe errors on a host without a TPU
  b, g, n = args.prompts, args.samples, args.new_tokens

  hf, ours = hf_twin()
  n_params = sum(p.numel() for name, p in hf.named_parameters() if "visual" not in name)
  n_vision = sum(p.numel() for name, p in hf.named_parameters() if "visual" in name)
  ids, mask, pixels, grids = _prompts(np.random.default_rng(0), b, not args.text_only)
  t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
  images = {} if pixels is None else dict(pixel_values=torch.from_numpy(pixels),
                                          image_grid_thw=torch.tensor(grids))
  image = "text only" if pixels is None else f"one {IMAGE_SIDE}² image per prompt"
  lengths = mask.sum(1)
  print(f"rollout, {n_params / 1e6:.1f}M text + {n_vision / 1e6:.1f}M vision params, B={b} prompts "
        f"× G={g} samples, prompts {lengths.min()}–{lengths.max()} tokens ({image}), {n} new "
        f"tokens, temperature 1, top-p {TOP_P}, f32, {jax.devices()[0].platform}, "
        f"torch threads={torch.get_num_threads()}, CPU: {cpu_model()}")
  short = max(1, n // 4)
  config = SamplerConfig(stop_tokens=(STOP,), num_samples=g, new_token_buckets=(n,),
                         sampling=sampling.SamplingParams(temperature=1.0, top_p=TOP_P),
                         prompt_buckets=tuple(range(64, 1025, 32)))
  # Rows still writing for tokens 2..n (the first comes from the prefill's logits).
  short_rows = (b - (b + 1) // 2) * g
  cases = [
      ("equal lengths", Sampler(ours, dataclasses.replace(config, stop_tokens=())),
       dict(min_new_tokens=n), b * g * n, 3, [b * g] * (n - 1)),
      (f"length spread (half the rows stop at {short})",
       SpreadSampler(ours, dataclasses.replace(config, compact_every=args.compact_every),
                     short=short),
       dict(logits_processor=transformers.LogitsProcessorList(
           [SpreadProcessor(ids.shape[1], short, g)])),
       b * g * n - (b + 1) // 2 * g * (n - short), 5,
       [b * g] * (short - 1) + [short_rows] * (n - short)),
  ]
  matmuls = TextMatmuls(ours)
  step_s = {rows: matmuls.seconds(rows, rows) for rows in {b * g, short_rows}}
  prefill_floor = matmuls.seconds(int(lengths.sum()), b)
  # Compile time = tracing + lowering + XLA compilation of a first call, from jax's own events.
  compile_s = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **_: compile_s.append(secs) if event.startswith("/jax/core/compile/")
      else None)
  for name, sampler, hf_kwargs, tokens, target, live_rows in cases:
    keys = iter(jax.random.split(jax.random.key(0), args.repeats + 1))

    def run_jax(sampler=sampler, keys=keys, tokens=tokens):
      out = sampler(ids, mask, next(keys), max_new_tokens=n, pixel_values=pixels,
                    image_grid_thw=grids)
      assert int(np.asarray(out.lengths).sum()) == tokens

    def run_hf(hf_kwargs=hf_kwargs, tokens=tokens):
      with torch.no_grad():
        # mm_token_type_ids: transformers applies 3-D image positions only when it is given.
        out = hf.generate(input_ids=t_ids, attention_mask=t_mask,
                          mm_token_type_ids=(t_ids == BENCH.image_token_id).int(), **images,
                          do_sample=True, temperature=1.0, top_p=TOP_P, top_k=0,
                          num_return_sequences=g, max_new_tokens=n, pad_token_id=STOP,
                          **hf_kwargs)
      written = out[:, ids.shape[1]:]
      ended = (written == STOP).int().cumsum(1)
      assert int(((ended == 0) | ((ended == 1) & (written == STOP))).sum()) == tokens

    compile_s.clear()
    first_s = _seconds(run_jax)[0]
    compiled_s = sum(compile_s)
    run_hf()
    # Alternating the two sides makes them share whatever else the machine is doing; CPU seconds
    # are reported too, as they move less than wall time when other processes compete for cores.
    times = [(_seconds(run_jax), _seconds(run_hf)) for _ in range(args.repeats)]
    (t_jax, cpu_jax), (t_hf, cpu_hf) = (
        tuple(statistics.median(t[side][i] for t in times) for i in range(2)) for side in range(2))
    print(f"{name}: {tokens} tokens")
    print(f"  sampler  median {t_jax:7.2f} s  {tokens / t_jax:8.1f} tokens/s  "
          f"(CPU {cpu_jax:6.2f} s)  first call {first_s:.2f} s, of which compile "
          f"{compiled_s:.2f} s")
    print(f"  hf       median {t_hf:7.2f} s  {tokens / t_hf:8.1f} tokens/s  (CPU {cpu_hf:6.2f} s)")
    print(f"  ratio sampler/hf tokens/s = {t_hf / t_jax:.2f}   (target >= {target}; "
          f"by CPU seconds {cpu_hf / cpu_jax:.2f})")
    floor = prefill_floor + sum(step_s[rows] for rows in live_rows)
    print(f"  floor    {floor:7.2f} s  text weight matmuls alone: prefill {prefill_floor:.2f} s on "
          f"{lengths.sum()} real prompt tokens, then {len(live_rows)} steps on their live rows; "
          f"ratio ceiling on this machine {t_hf / floor:.2f}")


if __name__ == "__main__":
  main()
