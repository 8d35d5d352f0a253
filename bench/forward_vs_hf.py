"""Forward time of the Flax model ÷ Hugging Face PyTorch on the same config and batch (CPU, f32).

python bench/forward_vs_hf.py [--batch 4 --length 256 --repeats 7]

Prints median times after warm-up, the ratio (target ≤ 0.8), and the Flax compile time separately.
Both sides use the machine's default thread pools.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers
from flax import nnx

from robot_r1_jax import model as model_lib

# ≈74M parameters: large enough that matmuls dominate, small enough for a 2-core CPU.
BENCH = model_lib.ModelConfig(
    text=model_lib.TextConfig(vocab_size=32003, hidden_size=768, intermediate_size=2048,
                              num_layers=8, num_heads=12, num_kv_heads=2,
                              mrope_section=(8, 12, 12), tie_word_embeddings=True),
    vision=model_lib.VisionConfig(depth=4, hidden_size=256, intermediate_size=704, num_heads=4,
                                  out_hidden_size=768, fullatt_block_indexes=(1, 3)),
    image_token_id=32000, video_token_id=32001, vision_start_token_id=31998,
    vision_end_token_id=31999, bos_token_id=0, eos_token_id=1)


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()

  torch.manual_seed(0)
  hf = transformers.Qwen2_5_VLForConditionalGeneration(
      transformers.Qwen2_5_VLConfig(**model_lib.to_hf_config(BENCH))).eval()
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    _, ours = model_lib.load_hf(tmp)
  n_params = sum(p.numel() for n, p in hf.named_parameters() if "visual" not in n)

  rng = np.random.default_rng(0)
  ids = rng.integers(0, 31990, size=(args.batch, args.length))
  mask = np.ones_like(ids)
  t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
  pos = torch.arange(args.length)[None, None].expand(3, args.batch, -1)

  graphdef, state = nnx.split(ours)
  forward = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))
  start = time.perf_counter()
  compiled = forward.lower(state, ids, mask).compile()
  compile_s = time.perf_counter() - start
  run_jax = lambda: jax.block_until_ready(compiled(state, ids, mask))
  run_jax()

  def run_hf():
    with torch.no_grad():
      hf(input_ids=t_ids, attention_mask=t_mask, position_ids=pos)

  run_hf()
  t_jax = _median_time(run_jax, args.repeats)
  t_hf = _median_time(run_hf, args.repeats)
  print(f"text-only forward, {n_params / 1e6:.1f}M params, B={args.batch} T={args.length}, f32, "
        f"{jax.devices()[0].platform}, torch threads={torch.get_num_threads()}")
  print(f"  flax   median {t_jax * 1e3:8.1f} ms   (compile {compile_s:.2f} s)")
  print(f"  hf     median {t_hf * 1e3:8.1f} ms")
  print(f"  ratio flax/hf = {t_jax / t_hf:.3f}   (target <= 0.8)")


if __name__ == "__main__":
  main()
