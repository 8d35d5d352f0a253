"""`--compile_only --topology=…`: every executable of a run, compiled for a TPU slice on this host.

    python -m robot_r1_jax.launch --compile_only --topology=v5p:2x2x4 \
        --flagfile=robot_r1_jax/launch/configs/robot_r1_paper.cfg --model=qwen2_5_vl_7b

libtpu compiles for a named topology without a TPU (MaxText's train_compile.py does this for one
training step; here it is the whole RL run, images included). The run is built as training builds
it — the mesh from `--mesh` over the slice's devices, parameters and optimizer state abstract with
their real shardings, the samplers, learner and SFT trainer of the stages — and each executable is
lowered at the shapes the flags imply: the prompt bucket of the run's longest question with its
`--image_size` image, the `--max_new_tokens` bucket, the rollout, update, micro, SFT and eval batch
sizes. No weight or data is read. Each one's per-chip memory (XLA's memory analysis: arguments,
outputs, temporaries, the outputs aliased to donated arguments) is set against the chip's HBM,
printed, and written to WORKDIR/compile_report.json.

Beside the memory, a roofline: each executable's matmul FLOPs and HBM bytes per chip, read from its
compiled HLO with every loop body weighted by its trip count (`hlo.program_cost`; the decode loop
counts its whole new-token budget, a retry inside it one round), and the time they take at the
chip's data-sheet peak FLOP/s and HBM bandwidth. The larger of the two is a lower bound on the
executable's time, and the FLOP time over it an upper bound on its MFU. The FLOPs are those the
program executes (remat's recomputation included), at least the model's, so the bound holds for
MFU too.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.util
import json
import operator
import os
import pathlib
import time
from typing import Any, Callable, Collection

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from robot_r1_jax.data import atomic, mcqa, sft_targets
from robot_r1_jax.data.loader import LoaderConfig
from robot_r1_jax.data.prompts import QUESTION_TYPES
from robot_r1_jax.generate.batching import bucket
from robot_r1_jax.generate.sampler import SamplerConfig
from robot_r1_jax.generate.sampling import SamplingParams
from robot_r1_jax.launch import chips as chips_lib
from robot_r1_jax.launch import hlo
from robot_r1_jax.launch import mesh as mesh_lib
from robot_r1_jax.launch import pipeline
from robot_r1_jax.launch.config import RunConfig
from robot_r1_jax.model import config as model_config
from robot_r1_jax.model import attention, processor, sharding
from robot_r1_jax.model.qwen2_5_vl import Qwen25VL
from robot_r1_jax.stages.context import StageContext
from robot_r1_jax.stages.rl_step import Learner, TrainRows
from robot_r1_jax.stages.sft_step import SftTrainer
from robot_r1_jax.train import optim
from robot_r1_jax.train.scoring import Sequences

GIB = chips_lib.GIB
LOOPS_SHOWN = 3  # loops with collectives listed per executable in the printed report
TOPOLOGY_FORMS = "v5e:2x2, v5e:4x4, v6e:4x4, v5p:2x2x4, v4:2x2x4 (CHIP:SHAPE, CHIP one of " + (
    ", ".join(chips_lib.TPUS) + ")")


class CompileError(ValueError):
  """The compile cannot start as asked; the message names the flag or the install to change."""


# ------------------------------------------------------------------------------------------------
# The slice and the shapes.


def topology_devices(name: str) -> tuple[list[Any], chips_lib.Chip]:
  """(the slice's devices, one per chip; the chip) for a topology name like v5e:4x4."""
  chip, sep, shape = name.partition(":")
  if not sep or chip not in chips_lib.TPUS or not shape:
    raise CompileError(f"--topology={name!r} is not a TPU topology; known forms: {TOPOLOGY_FORMS}")
  if importlib.util.find_spec("libtpu") is None:
    raise CompileError("--compile_only needs libtpu to compile for a TPU topology: "
                       "pip install -c constraints.txt -e '.[tpu]'")
  # libtpu locks /tmp/libtpu_lockfile for the one process that may drive a host's TPU; a
  # deviceless compile drives none, so several may run at once (a test session, a sweep).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  # A v4 chip has two cores; megacore makes them one device, so devices count chips.
  extra = {"chip_config_name": "megacore"} if chip == "v4" else {}
  try:
    topology = topologies.get_topology_desc(topology_name=name, platform="tpu", **extra)
  except Exception as e:  # libtpu raises its runtime error type for an unknown shape
    raise CompileError(f"--topology={name!r}: libtpu refuses it ({e}); known forms: "
                       f"{TOPOLOGY_FORMS}") from None
  return list(topology.devices), chips_lib.TPUS[chip]


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The run's shapes as the flags imply them."""

  prompt_length: int  # T: the prompt bucket of the run's longest question
  grid: tuple[int, int, int]  # every image's (t, h, w) patch grid
  new_tokens: int  # R: the new-token bucket
  target_length: int  # the SFT target bucket of the longest target

  @property
  def patches(self) -> int:
    return int(np.prod(self.grid))


def run_shapes(config: RunConfig, tokenizer: Any) -> Shapes:
  """Builds one question of every type with the run's prompt style and image size, and buckets
  its prompt and SFT target with the run's tokenizer."""
  size = config.data.image_size
  _, grid = processor.preprocess_image(np.zeros((size, size, 3), np.uint8))
  ctx = mcqa.FrameContext(task="take_lid_off_saucepan", episode="e/variation0/episode0", frame=0,
                          next_keyframe=10, description="take the lid off the saucepan",
                          state_xyz=(0.281, -0.104, 0.913), next_xyz=(0.312, 0.052, 0.871))
  questions = [q for t in QUESTION_TYPES if (q := mcqa.build_question(
      t, ctx, seed=0, config=mcqa.McqaConfig(prompt_style=config.data.prompt_style)))]
  longest = max(len(processor.build_prompt_ids(tokenizer, q.prompt, grid)) for q in questions)
  end = tokenizer.convert_tokens_to_ids("<|im_end|>")
  target = max(len(tokenizer(sft_targets.target_text(q, config.sft.targets),
                             add_special_tokens=False)["input_ids"]) + (end is not None)
               for q in questions)
  samplers = SamplerConfig(stop_tokens=())
  return Shapes(
      prompt_length=config.compile_prompt_length or bucket(longest, samplers.prompt_buckets,
                                                           "prompt length"),
      grid=tuple(int(v) for v in grid),
      new_tokens=bucket(config.rl.step.max_new_tokens, samplers.new_token_buckets,
                        "max_new_tokens"),
      target_length=bucket(target, config.sft.target_buckets, "SFT target length"))


# ------------------------------------------------------------------------------------------------
# Abstract inputs.


def _rows(mesh: Mesh, shape: tuple[int, ...], dtype, leading: int = 0) -> jax.ShapeDtypeStruct:
  """An abstract array whose row axis (after `leading` axes) is split over (data, fsdp)."""
  names = (None,) * leading + ("batch",) + (None,) * (len(shape) - leading - 1)
  return jax.ShapeDtypeStruct(shape, dtype,
                              sharding=NamedSharding(mesh, sharding.logical_to_spec(names)))


def _sequences(mesh: Mesh, shapes: Shapes, rows: int, completion: int, micro: int | None = None
               ) -> Sequences:
  """Prompt + completion rows [rows, …], or stacked in micro-batches [rows / micro, micro, …]."""
  if micro is None:
    field = lambda *shape, dtype=jnp.int32: _rows(mesh, (rows,) + shape, dtype)
  else:
    field = lambda *shape, dtype=jnp.int32: _rows(mesh, (rows // micro, micro) + shape, dtype,
                                                  leading=1)
  return Sequences(prompt_ids=field(shapes.prompt_length), prompt_mask=field(shapes.prompt_length),
                   completion=field(completion), completion_mask=field(completion),
                   pixel_values=field(shapes.patches, 1176, dtype=jnp.float32))


def _from_compiled(lowered: jax.stages.Lowered, compiled: jax.stages.Compiled) -> Any:
  """The outputs of a compiled executable as abstract arrays with their shardings."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      lowered.out_info, compiled.output_shardings)


# ------------------------------------------------------------------------------------------------
# The executables.


@dataclasses.dataclass(frozen=True)
class Executable:
  """One compiled program's memory per chip (bytes)."""

  name: str
  what: str
  arguments: int
  outputs: int
  temps: int
  aliased: int
  compile_seconds: float
  resident: int = 0  # the stage's state in HBM meanwhile that is not an argument
  # XLA's own peak of the program's buffers (0: unknown, or several programs).
  heap: int = 0
  # Collectives per iteration of each while loop; None when the HLO text could not be read.
  loops: tuple[hlo.LoopCollectives, ...] | None = ()
  cost: hlo.Cost | None = None  # FLOPs and HBM bytes of one run
  # Pallas kernels called (name → call sites): their FLOPs are not in `cost`, XLA cannot see them.
  kernels: dict[str, int] | None = dataclasses.field(default_factory=dict)
  hlo_error: str = ""  # why the loops, the cost and the kernels are None

  @property
  def peak(self) -> int:
    """The program's peak plus the resident state. The program's is XLA's (`heap`: its buffer
    assignment reuses a donated argument's buffer for temporaries once the argument is read: 4 GiB
    of the 7B update on v5e); without it, arguments, outputs and temporaries live at once, less the
    outputs written into donated argument buffers, a bound."""
    bound = self.arguments + self.outputs + self.temps - self.aliased
    return (self.heap or bound) + self.resident


# One program, or programs run one after another whose outputs all stay (the layout copy's, one per
# parameter), and what to do with the compiled program(s).
Lowering = Callable[[], tuple[jax.stages.Lowered | list[jax.stages.Lowered],
                              Callable[[jax.stages.Compiled], None] | None]]


def _chip_bytes(tree: Any) -> int:
  """Bytes of one chip's shards of the abstract arrays in `tree` that live in its HBM (host
  memory kinds, such as an offloaded reference, do not count)."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree) if x.sharding.memory_kind in (None, "device"))


def _plan(config: RunConfig, context: StageContext, shapes: Shapes
          ) -> list[tuple[str, str, Lowering, int]]:
  """(name, what it is, a function lowering it, resident bytes per chip) for every executable the
  run uses, in run order.

  A lowering also returns a hook that receives its compiled program (the decode loop's inputs are
  the prefill's outputs). Resident bytes are the stage's state that stays in HBM while the
  executable runs without being one of its arguments: the optimizer state and the reference
  during a rollout, say. Evaluation is charged the RL stage's state when the run has one.
  """
  mesh, rl, sft = context.mesh, config.rl, config.sft
  params = nnx.state(context.model)
  grid1 = shapes.grid
  plan: list[tuple[str, str, Lowering, int]] = []
  state = {"params": _chip_bytes(params)}  # the state alive through the stage that samples
  if config.runs_rl:
    step = rl.step
    sampler = context.sampler(rl.sampling, num_samples=step.num_generations,
                              chunk_prompts=rl.rollout_chunk_size)
    optimizer, _ = optim.build_optimizer(rl.optimizer, 1)
    learner = Learner(context.model, optimizer, sampler, step, mesh)
    state.update(opt_state=_chip_bytes(learner.opt_state),
                 reference=_chip_bytes(learner.ref_params))
  besides = lambda *read: sum(v for k, v in state.items() if k not in read)

  def generation(prefix: str, sampler, prompts: int, what: str):
    grids = (grid1,) * prompts
    layout, done = sampler.layout, {}

    # Each lowering runs under the layout's mesh, inside compile_run's (the trainer's).
    def weights():
      with sharding.on_mesh(layout):
        lowered = sampler.layout_copy.lower(params)
      return lowered, lambda _: done.update(params=sampler.layout_copy(params))

    def prefill():
      with sharding.on_mesh(layout):
        lowered = sampler.prefill_step.lower(
            done["params"], _rows(layout, (prompts, shapes.prompt_length), jnp.int32),
            _rows(layout, (prompts, shapes.prompt_length), jnp.bool_),
            _rows(layout, (prompts,), jnp.int32),
            _rows(layout, (prompts * shapes.patches, 1176), jnp.float32), grid=grids,
            new_bucket=shapes.new_tokens)
      return lowered, lambda compiled: done.update(state=_from_compiled(lowered, compiled))

    def decode():
      state = done["state"]
      scalar = NamedSharding(layout, PartitionSpec())
      key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                                 sharding=scalar)
      budget = jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar)
      with sharding.on_mesh(layout):
        return sampler.decode_loop.lower(done["params"], state.cache,
                                         dataclasses.replace(state, cache=None), key,
                                         budget), None

    rows = prompts * sampler.config.num_samples
    plan.append((f"{prefix}_layout", f"the parameters in {jnp.dtype(sampler.model.dtype).name} "
                 f"over tensor={layout.shape['tensor']} × data={layout.shape['data']} (once per "
                 "call)", weights, besides("params")))
    plan.append((f"{prefix}_prefill", f"{prompts} prompts × {shapes.prompt_length} tokens + images"
                 f" → their cache, which {rows} rows continue ({what})", prefill, besides()))
    plan.append((f"{prefix}_decode", f"{rows} rows × {shapes.new_tokens} new tokens ({what})",
                 decode, besides()))

  if config.runs_sft:
    optimizer, _ = optim.build_optimizer(sft.optimizer, 1)
    trainer = SftTrainer(context.model, optimizer, mesh, micro_batch_size=sft.micro_batch_size)
    seqs = _sequences(mesh, shapes, sft.batch_size, shapes.target_length, sft.micro_batch_size)
    plan.append(("sft_step", f"{sft.batch_size} rows in micro-batches of {sft.micro_batch_size},"
                 f" targets of {shapes.target_length}", lambda: (trainer.train_step.lower(
                     trainer.params, trainer.opt_state, seqs, image_grid=grid1), None), 0))
  if config.evaluates:
    generation("eval", context.sampler(SamplingParams(temperature=0.0)), config.eval.batch_size,
               "greedy evaluation")
  if config.runs_rl:
    chunk = rl.rollout_chunk_size or rl.rollout_batch_size
    generation("rollout", sampler, chunk, f"G = {step.num_generations}" + (
        f", one of {rl.rollout_batch_size // chunk} chunks" if chunk < rl.rollout_batch_size
        else ""))
    micro = step.micro_batch_size
    scored = _sequences(mesh, shapes, micro, shapes.new_tokens)  # one micro-batch per call
    on_policy = rl.updates_per_step == 1
    if learner.ref_params is not None:
      where = ", copied in from host memory" if step.offload_reference else ""
      plan.append(("reference_log_probs",
                   f"{micro} rows, the reference in the compute dtype{where}",
                   lambda: (learner.log_probs_step.lower(learner.reference(), scored,
                                                         image_grid=grid1), None),
                   besides("reference")))
    if not on_policy:
      plan.append(("old_log_probs", f"{micro} rows, once per rollout", lambda: (
          learner.log_probs_step.lower(learner.params, scored, image_grid=grid1), None),
          besides("params")))
    rows = step.train_batch_size * step.num_generations
    seqs = _sequences(mesh, shapes, rows, shapes.new_tokens, micro)
    per_token = _rows(mesh, (rows // micro, micro, shapes.new_tokens), jnp.float32, leading=1)
    batch = TrainRows(seqs=seqs, old_logp=per_token, ref_logp=per_token, advantages=per_token,
                      rollout_logp=per_token)
    plan.append(("rl_update", f"{rows} rows in micro-batches of {micro}", lambda: (
        learner.train_step.lower(learner.params, learner.opt_state, batch, image_grid=grid1,
                                 on_policy=on_policy), None), besides("params", "opt_state")))
  return plan


# ------------------------------------------------------------------------------------------------
# The report.


@dataclasses.dataclass(frozen=True)
class Report:
  topology: str
  chips: int
  hbm_per_chip: int  # bytes
  peak_flops: float  # per chip, FLOP/s (data sheet)
  hbm_bandwidth: float  # per chip, bytes/s (data sheet)
  mesh: dict[str, int]
  model: str
  shapes: Shapes
  executables: tuple[Executable, ...]

  @property
  def too_big(self) -> list[Executable]:
    return [e for e in self.executables if e.peak > self.hbm_per_chip]

  def roofline(self, e: Executable) -> tuple[float, float] | None:
    """(seconds at least, MFU at most) of one run of `e` on this chip; None without its cost."""
    if e.cost is None:
      return None
    compute, memory = e.cost.flops / self.peak_flops, e.cost.bytes / self.hbm_bandwidth
    floor = max(compute, memory)
    return floor, compute / floor if floor else 0.0

  def table(self) -> str:
    g = lambda b: f"{b / GIB:.2f}"
    header = ["executable", "arguments", "outputs", "temps", "aliased", "resident", "peak GiB",
              "of HBM", "fits", "loop collectives MiB/iter", "TFLOP", "GB moved", "≥ ms",
              "MFU ≤"]
    rows = []
    for e in self.executables:
      roofline = self.roofline(e)
      rows.append([e.name, g(e.arguments), g(e.outputs), g(e.temps), g(e.aliased), g(e.resident),
                   g(e.peak), f"{100 * e.peak / self.hbm_per_chip:.0f}%",
                   "yes" if e.peak <= self.hbm_per_chip else "NO",
                   "n/a" if e.loops is None else
                   f"{max((l.total_bytes for l in e.loops), default=0) / 2**20:.2f}"] + (
                       ["n/a"] * 4 if roofline is None else
                       [f"{e.cost.flops / 1e12:.3g}", f"{e.cost.bytes / 1e9:.3g}",
                        f"{roofline[0] * 1e3:.3g}", f"{100 * roofline[1]:.0f}%"]))
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                       for c, (cell, w) in enumerate(zip(row, widths))) for row in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    title = (f"{self.model} on {self.topology} ({self.chips} chips × "
             f"{self.hbm_per_chip / GIB:.0f} GiB HBM), mesh {self.mesh}; prompt bucket "
             f"{self.shapes.prompt_length}, image grid {list(self.shapes.grid)}, "
             f"{self.shapes.new_tokens} new tokens — per chip: memory in GiB; FLOPs, bytes and "
             f"their time at {self.peak_flops / 1e12:.0f} TFLOP/s and "
             f"{self.hbm_bandwidth / 1e9:.0f} GB/s")
    loops = []
    for e in self.executables:  # the heaviest few per executable; all of them in the JSON
      busy = sorted((l for l in e.loops or () if l.counts), key=lambda l: -l.total_bytes)
      loops += [f"  {e.name} · {l.summary()}" for l in busy[:LOOPS_SHOWN]]
      if len(busy) > LOOPS_SHOWN:
        more = len(busy) - LOOPS_SHOWN
        loops.append(f"  {e.name} · {more} more loop{'s' * (more > 1)} with collectives")
    kernels = [f"  {e.name}: " + ", ".join(f"{k} ×{n}" for k, n in e.kernels.items())
               for e in self.executables if e.kernels]
    return "\n".join([title, *lines] + (["collectives inside loops (per device, heaviest "
                                          "first):", *loops] if loops else []) + (
        ["Pallas kernels (call sites; their FLOPs are not in the TFLOP column):", *kernels]
        if kernels else []))

  def to_json(self) -> str:
    data = dataclasses.asdict(self)
    for row, e in zip(data["executables"], self.executables):
      row["peak"] = e.peak
      roofline = self.roofline(e)
      row["floor_seconds"], row["mfu_bound"] = roofline if roofline else (None, None)
    return json.dumps(data, indent=1) + "\n"


def compile_run(config: RunConfig, *, only: Collection[str] | None = None,
                progress: Callable[[str], None] = print) -> Report:
  """Compiles every executable of `config`'s run for `config.topology` (see the module docstring),
  or those named in `only` (and what they need: a decode loop's prefill).

  The persistent compilation cache is switched off: it cannot load a deviceless TPU executable
  back. JAX decides whether to use it at a process's first compile, so call this in a process
  that has not compiled anything yet (the launcher's --compile_only does).

  Raises:
    CompileError: a bad topology, no libtpu, or a mesh or batch that does not fit the slice.
  """
  jax.config.update("jax_enable_compilation_cache", False)
  devices, chip = topology_devices(config.topology)
  try:
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    mesh_lib.check_batches(config.batch_sizes, mesh)
  except mesh_lib.MeshSpecError as e:
    raise CompileError(f"{e}, on {config.topology} ({len(devices)} chips)") from None
  cfg, model_dir = _model_config(config.model.name)
  dtype = jnp.bfloat16 if config.model.compute_dtype == "bfloat16" else jnp.float32
  impl = attention.resolve(config.model.attention, "tpu")
  model = nnx.eval_shape(lambda: Qwen25VL(cfg, dtype=dtype, remat=config.model.remat,
                                          attention_implementation=impl, rngs=nnx.Rngs(0)))
  sharding.abstract_params(model, mesh)
  tokenizer, tokenizer_path = pipeline.load_tokenizer(config.model.tokenizer, model_dir)
  shapes = run_shapes(config, tokenizer)
  context = StageContext(model=model, tokenizer=tokenizer, mesh=mesh, data_dir=config.workdir,
                         loader=LoaderConfig(tokenizer_path=tokenizer_path),
                         tensor_parallel=config.rollout_tensor_parallel)
  plan = _plan(config, context, shapes)
  if only is not None:
    unknown = sorted(set(only) - {item[0] for item in plan})
    if unknown:
      raise CompileError(f"this run has no executable {unknown}; it has "
                         f"{[item[0] for item in plan]}")
    # A generation's prefill reads its layout's outputs, its decode loop the prefill's too.
    needed = set(only)
    for name in only:
      prefix, _, kind = name.rpartition("_")
      if kind in ("prefill", "decode"):
        needed |= {f"{prefix}_layout", f"{prefix}_prefill"}
    plan = [item for item in plan if item[0] in needed]
  done = []
  for i, (name, what, lower, resident) in enumerate(plan, start=1):
    progress(f"[{i}/{len(plan)}] compiling {name}: {what} …")
    start = time.perf_counter()
    with sharding.on_mesh(mesh):
      lowered, hook = lower()
      # The decode loop is the one loop that stops on data: charge it the whole budget.
      measured = _measure(lowered, shapes.new_tokens if name.endswith("_decode") else 1)
    compiled = measured.pop("compiled")
    if hook is not None:
      hook(compiled)
    if measured["hlo_error"]:
      progress(f"      its HLO text could not be read, so its loop collectives and roofline "
               f"are left out: {measured['hlo_error']}")
    done.append(Executable(name=name, what=what,
                           compile_seconds=round(time.perf_counter() - start, 1),
                           resident=resident, **measured))
    progress(f"      {done[-1].peak / GIB:.2f} GiB per chip, compiled in "
             f"{done[-1].compile_seconds:.0f} s")
  report = Report(topology=config.topology, chips=len(devices), hbm_per_chip=chip.hbm_bytes,
                  peak_flops=chip.peak_flops, hbm_bandwidth=chip.hbm_bandwidth,
                  mesh=dict(mesh.shape), model=config.model.name, shapes=shapes,
                  executables=tuple(done))
  atomic.write_bytes(epath.Path(config.workdir) / "compile_report.json",
                     report.to_json().encode())
  return report


def _measure(lowered: jax.stages.Lowered | list[jax.stages.Lowered], unknown_trips: int
             ) -> dict[str, Any]:
  """Compiles the program(s) and reads the `Executable` fields of their memory and HLO, with
  "compiled" (the last program). Programs run one after another with their outputs kept add up
  their arguments, outputs and costs; their temporaries do not (one program's at a time). Equal
  programs (the same HLO: parameters of one shape) compile once."""
  programs = lowered if isinstance(lowered, list) else [lowered]
  # A single program's key is not its text: printing a 7B update's text takes seconds.
  runs = [program.as_text() for program in programs] if len(programs) > 1 else [""]
  compiled, read = {}, {}
  for program, text in zip(programs, runs):
    if text not in compiled:
      compiled[text] = program.compile()
      read[text] = read_hlo(compiled[text], unknown_trips)
  memory = [compiled[text].memory_analysis() for text in runs]
  hlos = [read[text] for text in runs]
  errors = [error for *_, error in hlos if error]
  costs = [cost for _, cost, _, _ in hlos]
  kernels = collections.Counter()
  for _, _, found, _ in hlos:
    kernels.update(found or {})
  return dict(arguments=sum(m.argument_size_in_bytes for m in memory),
              outputs=sum(m.output_size_in_bytes for m in memory),
              temps=max(m.temp_size_in_bytes for m in memory),
              aliased=sum(m.alias_size_in_bytes for m in memory),
              heap=memory[0].peak_memory_in_bytes if len(memory) == 1 else 0,
              loops=None if errors else tuple(l for loops, *_ in hlos for l in loops),
              cost=None if errors else functools.reduce(operator.add, costs),
              kernels=None if errors else dict(kernels),
              hlo_error=errors[0] if errors else "", compiled=compiled[runs[-1]])


def read_hlo(compiled: jax.stages.Compiled, unknown_trips: int = 1
             ) -> tuple[tuple[hlo.LoopCollectives, ...] | None, hlo.Cost | None,
                        dict[str, int] | None, str]:
  """(the loops' collectives, the cost of one run, the Pallas kernels, "") or (None, None, None,
  why). Printing the HLO is a
  libtpu service that some versions fail on programs they compiled fine (0.0.52: "async-update
  instruction should have 1 operands"); the memory report does not need it. `unknown_trips`:
  iterations charged to a loop whose count the HLO does not give."""
  try:
    module = hlo.parse(compiled.as_text())
    return (tuple(hlo.loop_collectives(module)), hlo.program_cost(module, unknown_trips),
            hlo.kernels(module), "")
  except Exception as e:  # noqa: BLE001 - any failure of the text dump or its parse
    why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    return None, None, None, why


def _model_config(name: str) -> tuple[model_config.ModelConfig, pathlib.Path | None]:
  """A preset's config, or a local Hugging Face directory's config.json (no weights read)."""
  if name in model_config.PRESETS:
    return model_config.PRESETS[name](), None
  path = pathlib.Path(name)
  if not (path / "config.json").is_file():
    raise CompileError(f"--model={name!r} is neither a preset ({', '.join(model_config.PRESETS)})"
                       " nor a directory with config.json")
  return model_config.from_hf_config(json.loads((path / "config.json").read_text())), path
