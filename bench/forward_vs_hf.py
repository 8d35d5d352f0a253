"""Forward time of the Flax model ÷ Hugging Face PyTorch on the same config and batch (CPU, f32).

python bench/forward_vs_hf.py [--batch 4 --length 256 --repeats 7]

Two cases: text only, and one 224×224 image per prompt (64 merged image tokens inside the same
length). Prints the CPU, median times after warm-up (the sides alternate), the ratio (target ≤ 0.7),
the Flax compile time, and the vision tower's share of the multimodal forward. Both sides use the
machine's thread pools. Beside the ratio, two bounds on this machine, neither counting the vision
tower: the floor, the text model's weight matmuls and LM head alone at the batch's shape
(`machine.TextMatmuls`, timed in the same run), which no forward of this model can beat; and the
ideal, those FLOPs plus causal attention's at the machine's best f32 GEMM rate (the fastest of
30 runs of a 1024³ GEMM), which no program on this machine can beat: where the ideal's ratio is
near the target, the target leaves nothing for norms, RoPE, softmax or the GEMMs' own misses.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np
import torch
import transformers
from flax import nnx

from robot_r1_jax import model as model_lib
from robot_r1_jax.launch import console
from robot_r1_jax.model import processor

from machine import TextMatmuls, alternating_medians, cpu_model, gemm_flops_per_second

# ≈74M parameters: large enough that matmuls dominate, small enough for a 2-core CPU.
BENCH = model_lib.ModelConfig(
    text=model_lib.TextConfig(vocab_size=32003, hidden_size=768, intermediate_size=2048,
                              num_layers=8, num_heads=12, num_kv_heads=2,
                              mrope_section=(8, 12, 12), tie_word_embeddings=True),
    vision=model_lib.VisionConfig(depth=4, hidden_size=256, intermediate_size=704, num_heads=4,
                                  out_hidden_size=768, fullatt_block_indexes=(1, 3)),
    image_token_id=32000, video_token_id=32001, vision_start_token_id=31998,
    vision_end_token_id=31999, bos_token_id=0, eos_token_id=1)


def hf_twin(seed: int = 0):
  """A random HF model of the BENCH config and our model loaded from its saved weights."""
  torch.manual_seed(seed)
  hf = transformers.Qwen2_5_VLForConditionalGeneration(
      transformers.Qwen2_5_VLConfig(**model_lib.to_hf_config(BENCH))).eval()
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    _, ours = model_lib.load_hf(tmp)
  return hf, ours


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  console.skip_absent_tpu()  # no libtpu probe errors on a host without a TPU

  hf, ours = hf_twin()
  n_params = sum(p.numel() for n, p in hf.named_parameters() if "visual" not in n)

  rng = np.random.default_rng(0)
  ids = rng.integers(0, 31990, size=(args.batch, args.length))
  mask = np.ones_like(ids)
  graphdef, state = nnx.split(ours)
  tokens = args.batch * args.length
  matmuls = TextMatmuls(ours)
  floor = matmuls.seconds(tokens, tokens)
  text = BENCH.text
  # q·k and p·v over the causal half of each [T, T] score matrix, in every layer.
  attention_flops = (2 * 2 * args.batch * text.num_heads * text.head_dim * text.num_layers
                     * args.length * (args.length + 1) // 2)
  ideal_flops = matmuls.flops(tokens, tokens) + attention_flops
  gemm = gemm_flops_per_second()
  ideal = ideal_flops / gemm
  forward = jax.jit(lambda s, i, m, pv, grid: nnx.merge(graphdef, s)(i, m, pv, grid),
                    static_argnums=4)

  def case(name, ids, pixel_values=None, grid=None):
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    mm = (t_ids == BENCH.image_token_id).int()
    pos, _ = hf.model.get_rope_index(t_ids, mm_token_type_ids=mm, attention_mask=t_mask,
                                     image_grid_thw=None if grid is None else torch.tensor(grid))
    start = time.perf_counter()
    compiled = forward.lower(state, ids, mask, pixel_values, grid).compile()
    compile_s = time.perf_counter() - start
    run_jax = lambda: jax.block_until_ready(compiled(state, ids, mask, pixel_values))
    kwargs = {} if grid is None else dict(pixel_values=torch.from_numpy(pixel_values),
                                          image_grid_thw=torch.tensor(grid))

    def run_hf():
      with torch.no_grad():
        hf(input_ids=t_ids, attention_mask=t_mask, position_ids=pos, **kwargs)

    run_jax(), run_hf()
    t_jax, t_hf = alternating_medians((run_jax, run_hf), args.repeats)
    print(f"{name}: B={args.batch} T={args.length}, f32, {jax.devices()[0].platform}, "
          f"torch threads={torch.get_num_threads()}, CPU: {cpu_model()}")
    print(f"  flax   median {t_jax * 1e3:8.1f} ms   (compile {compile_s:.2f} s)")
    print(f"  hf     median {t_hf * 1e3:8.1f} ms")
    print(f"  ratio flax/hf = {t_jax / t_hf:.3f}   (target <= 0.7)")
    print(f"  floor  {floor * 1e3:8.1f} ms   text weight matmuls alone: ratio floor on this "
          f"machine {floor / t_hf:.3f}")
    print(f"  ideal  {ideal * 1e3:8.1f} ms   those and causal attention, {ideal_flops / 1e9:.1f} "
          f"GFLOP, at the best f32 GEMM rate ({gemm / 1e9:.1f} GFLOP/s): ratio {ideal / t_hf:.3f}")
    return t_jax

  print(f"{n_params / 1e6:.1f}M text parameters")
  case("text only", ids)

  image = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
  pv, grid = processor.preprocess_image(image)
  n_img = processor.image_token_count(grid)
  ids = ids.copy()
  ids[:, 8:8 + n_img] = BENCH.image_token_id
  ids[:, 7], ids[:, 8 + n_img] = BENCH.vision_start_token_id, BENCH.vision_end_token_id
  pixel_values = np.concatenate([pv] * args.batch)
  grids = (tuple(grid),) * args.batch
  t_full = case(f"one 224x224 image per prompt ({n_img} image tokens)", ids, pixel_values, grids)
  tower = jax.jit(lambda s, pv: nnx.merge(graphdef, s).vision(pv, grids))
  jax.block_until_ready(tower(state, pixel_values))
  (t_vision,) = alternating_medians(
      (lambda: jax.block_until_ready(tower(state, pixel_values)),), args.repeats)
  print(f"  vision tower alone {t_vision * 1e3:.1f} ms = {t_vision / t_full:.0%} of the forward")


if __name__ == "__main__":
  main()
