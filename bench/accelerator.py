"""The paper recipe's per-device shapes on whatever this machine has: update MFU, rollout tokens/s,
decode step time against the HBM-bandwidth floor, peak memory.

python bench/accelerator.py [--models qwen2_5_vl_3b,qwen2_5_vl_7b] [--mesh data=1,fsdp=-1,tensor=1
    --devices 0 --rows 5 --prompts 4 --generations 5 --prompt_length 1024 --new_tokens 1024
    --image_px 224 --repeats 2]

The model is sharded over the devices it finds (`--devices`, 0: all of this process's platform)
as the paper recipe runs it: the `--mesh` spec (the recipe's FSDP by default) and the rules table
place the f32 parameters and Adam state, and rollouts decode on the rollout layout, so the 7B runs
on an 8-GPU node or a TPU slice, which no single accelerator holds (~150 GB). `--rows` and
`--prompts` count per data-parallel group (a device under FSDP); the defaults are one chip's share
of the paper recipe on a 16-chip slice: the update runs a micro-batch of 5 rows (80 over 16 chips)
of a 1024-token prompt bucket and 1024 new tokens, the rollout 4 prompts × G = 5 (a 64-prompt
chunk over 16 chips). Each model is built with random weights (f32 parameters, bf16 compute,
remat; no download). For each, in one run, per device:
  - update MFU: the analytic FLOPs of one update (bench/train_step.py's formula: 6·N per token,
    attention scores and the vision tower, each prompt once for its G completions) ÷ the measured
    update time ÷ (devices × the chip's peak bf16 FLOP/s: a table by device kind; on CPU the f32
    GEMM rate measured here);
  - rollout tokens/s per device: rows × new tokens ÷ the rollout time ÷ devices (no stop token:
    every row decodes the whole budget);
  - decode step time ÷ the HBM floor: (rollout − prefill) ÷ new tokens, against the bytes one step
    must read on a device (its shard of the bf16 rollout layout and of the half-full KV cache) ÷
    the chip's HBM bandwidth (a table; on CPU a copy bandwidth measured here);
  - peak memory: the largest of the devices' allocator peaks (not reported by the CPU backend).
Targets on an accelerator (issue 20): MFU ≥ 0.40, decode ≤ 2× the floor. On a CPU the `small`
preset runs at small shapes so that CI keeps the script working; its figures are not targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from robot_r1_jax.launch import chips
from robot_r1_jax.launch import mesh as mesh_lib
from robot_r1_jax.model import config as config_lib
from robot_r1_jax.model import processor
from robot_r1_jax.model.qwen2_5_vl import init_model

from machine import gemm_flops_per_second  # bench/
from train_step import analytic_flops, build_learner, synthetic_batch  # bench/



@dataclasses.dataclass(frozen=True)
class Figures:
  model: str
  devices: int
  update_s: float
  mfu: float
  rollout_tokens_per_s: float
  decode_step_s: float
  decode_floor_s: float
  peak_bytes: int | None

  def line(self) -> str:
    peak = "n/a" if self.peak_bytes is None else f"{self.peak_bytes / 2**30:.1f} GiB"
    return (f"{self.model} on {self.devices} devices: update {self.update_s:.2f} s, "
            f"MFU {self.mfu:.2f}; rollout {self.rollout_tokens_per_s:.0f} tokens/s; "
            f"decode step {1e3 * self.decode_step_s:.2f} "
            f"ms = {self.decode_step_s / self.decode_floor_s:.1f}× the HBM floor "
            f"({1e3 * self.decode_floor_s:.2f} ms); peak memory {peak}")


def copy_bytes_per_second(n: int = 2**26, repeats: int = 10) -> float:
  """Read + write bytes per second of copying a large f32 array (the CPU's stand-in for HBM)."""
  x = jnp.ones((n,), jnp.float32)
  f = jax.jit(lambda a: a + 1.0)
  f(x).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * 4 * n / min(times)


def chip_rates() -> tuple[str, float, float]:
  """(what the rates are, peak FLOP/s, memory bytes/s) of device 0."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    return "CPU (measured f32 GEMM and copy rates)", gemm_flops_per_second(), \
        copy_bytes_per_second()
  chip = chips.by_device_kind(device.device_kind)
  if chip is None:
    raise SystemExit(f"no peak FLOP/s and HBM bandwidth known for device kind "
                     f"{device.device_kind!r}; add it to robot_r1_jax/launch/chips.py")
  return f"{device.device_kind} (data sheet)", chip.peak_flops, chip.hbm_bandwidth


def measure(name: str, args: argparse.Namespace, mesh: jax.sharding.Mesh, peak_flops: float,
            bandwidth: float) -> Figures:
  cfg = config_lib.PRESETS[name]()
  model = init_model(cfg, seed=0, dtype=jnp.bfloat16, remat=True, mesh=mesh)
  tokenizer = processor.load_tokenizer()
  devices = mesh.devices.size
  groups = mesh.shape["data"] * mesh.shape["fsdp"]  # the batch's shards
  local = groups // jax.process_count()  # each process feeds its own groups' rows
  rows = args.prompts * args.generations * groups
  # One update of `args.rows` sequences per group: the update's prompts are its share of G.
  update_prompts = max(args.rows * groups // args.generations, 1)
  learner = build_learner(model, tokenizer, mesh, prompts=update_prompts,
                          generations=args.generations, micro_batch=args.rows * groups,
                          prompt_length=args.prompt_length, new_tokens=args.new_tokens, top_p=0.99)
  sampler = learner.sampler
  batch = synthetic_batch(tokenizer, args.prompts * local, args.prompt_length, args.image_px)
  update_batch = synthetic_batch(tokenizer, update_prompts // jax.process_count(),
                                 args.prompt_length, args.image_px)

  def rollout() -> tuple[float, float]:
    """(prefill, prefill + decode) seconds; the rollout layout's copy is made once per rollout
    and not timed."""
    params = jax.block_until_ready(sampler.layout_params())
    start = time.perf_counter()
    state = sampler.prefill(batch.input_ids, batch.attention_mask, batch.pixel_values,
                            batch.image_grid_thw, max_new_tokens=args.new_tokens, params=params)
    jax.block_until_ready(state)
    prefilled = time.perf_counter()
    out = sampler.decode(state, jax.random.key(0), args.new_tokens, params=params)
    jax.block_until_ready(out.tokens)
    return prefilled - start, time.perf_counter() - start

  rollout()  # compiles
  timed = [rollout() for _ in range(args.repeats)]
  total = statistics.median(t for _, t in timed)
  decode_s = statistics.median(t - p for p, t in timed) / args.new_tokens
  learner.step(update_batch, jax.random.key(0))  # compiles
  update_s = statistics.median(learner.step(update_batch, jax.random.key(i + 1))
                               .metrics["time/update"] for i in range(args.repeats))
  patches = int(np.prod(update_batch.image_grid_thw[0]))
  flops = analytic_flops(cfg, update_prompts, args.generations, args.prompt_length,
                         args.new_tokens, patches)
  # The bytes one device reads per decode step: its shards of the layout's weights (split over
  # tensor, repeated over data) and of the cache (rows over data, K/V heads over tensor): each
  # prompt's slots once (its G samples share them), each row's half-written own slots.
  weights = sum(x.addressable_shards[0].data.nbytes
                for x in jax.tree.leaves(sampler.layout_params()))
  t = cfg.text
  slots = args.prompts * groups * args.prompt_length + rows * (args.new_tokens // 2)
  half_cache = slots * t.num_layers * 2 * t.num_kv_heads * t.head_dim * 2 / devices
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  return Figures(model=name, devices=devices, update_s=update_s,
                 mfu=flops / update_s / (devices * peak_flops),
                 rollout_tokens_per_s=rows * args.new_tokens / total / devices,
                 decode_step_s=decode_s, decode_floor_s=(weights + half_cache) / bandwidth,
                 peak_bytes=None if None in peaks else max(peaks))


def main(argv: list[str] | None = None) -> list[Figures]:
  on_cpu = jax.devices()[0].platform == "cpu"
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="small" if on_cpu else "qwen2_5_vl_3b,qwen2_5_vl_7b",
                      help="presets, comma-separated (random weights)")
  parser.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1",
                      help="mesh spec over the devices (the paper recipe's FSDP by default)")
  parser.add_argument("--devices", type=int, default=0,
                      help="how many of this platform's devices to shard over (0: all)")
  parser.add_argument("--rows", type=int, default=5,
                      help="sequences per update (micro-batch) per data-parallel group")
  parser.add_argument("--prompts", type=int, default=4,
                      help="rollout prompts per data-parallel group")
  parser.add_argument("--generations", type=int, default=5, help="G")
  parser.add_argument("--prompt_length", type=int, default=128 if on_cpu else 1024)
  parser.add_argument("--new_tokens", type=int, default=16 if on_cpu else 1024)
  parser.add_argument("--image_px", type=int, default=112 if on_cpu else 224)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args(argv)
  devices = jax.devices()
  mesh = mesh_lib.make_mesh(args.mesh, devices[:args.devices or len(devices)])
  what, peak_flops, bandwidth = chip_rates()
  print(f"{what}: peak {peak_flops / 1e12:.2f} TFLOP/s, memory {bandwidth / 1e9:.0f} GB/s; "
        f"mesh {dict(mesh.shape)}; per data-parallel group: update {args.rows} rows, rollout "
        f"{args.prompts} prompts × G = {args.generations}; {args.prompt_length}-token prompts, "
        f"{args.new_tokens} new tokens; figures per device", flush=True)
  figures = []
  for name in args.models.split(","):
    figures.append(measure(name, args, mesh, peak_flops, bandwidth))
    print("  " + figures[-1].line(), flush=True)
  return figures


if __name__ == "__main__":
  main()
