"""What a compiled program does per device, read from its optimised HLO text: the collectives
inside its loops, and the matmul FLOPs and HBM bytes of one run.

A collective in a loop body runs once per iteration: an FSDP all-gather of the weights inside a
decode loop moves the whole model once per generated token. `loop_collectives` finds every
`while` of a compiled (SPMD-partitioned) module and, per loop, the collectives its body runs per
iteration — in the body and in what it calls, but not in a nested loop's body, which is reported
as a loop of its own. Sizes are per device: the bytes of each op's result (for an all-gather the
gathered array; for an async `-start` op the larger half of its operand/result tuple). TPU's
async collective fusion writes one collective into several fusions (a start, continuations that
also compute, a done), each holding a copy with the same channel id: a channel counts once, in
the loop's collectives and in the bytes (the copies share its read and its write; the buffers the
fusions pass along unchanged are aliased and cost nothing).

XLA's own `cost_analysis()` counts a while loop's body once whatever its trip count (measured on
CPU and TPU: a 10-step `fori_loop` of a matmul reports one matmul's FLOPs), and every layer stack
here is a scan, so it reports one layer of 28. `program_cost` weights each body by its trip count,
read from the loop's condition (`i < N`; JAX's scan, map and fori_loop count from 0), or a count
the caller gives for a loop that stops on data (the decode loop).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
          "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
          "c64": 8, "c128": 16}
_COMPUTATION = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$")
_CALLED = re.compile(r"\b(?:condition|body|to_apply|calls|true_computation|false_computation)"
                     r"=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\](\{[^}]*\})?")
# A layout's memory space other than 0 (TPU: S(1) vector memory, S(2) scalar memory) is on chip.
_ON_CHIP = re.compile(r"S\([1-9]\d*\)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CHANNEL = re.compile(r"\bchannel_id=(\d+)")
_NAME = re.compile(r"%([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
# No HBM traffic of their own: views, bookkeeping, and ops whose callees are costed instead.
_FREE = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
                   "conditional", "call", "after-all", "partition-id", "replica-id",
                   "opt-barrier", "add-dependency", "domain"})
_SLICES = frozenset({"dynamic-slice", "slice", "gather"})


@dataclasses.dataclass(frozen=True)
class LoopCollectives:
  """The collectives one iteration of a `while` loop runs (per device)."""

  loop: str  # the loop's source op name, e.g. "jit(_decode_impl)/while"
  counts: dict[str, int]  # collective kind → ops per iteration
  bytes: dict[str, int]  # collective kind → result bytes per iteration

  @property
  def total_bytes(self) -> int:
    return sum(self.bytes.values())

  def summary(self) -> str:
    if not self.counts:
      return f"{self.loop}: no collectives"
    parts = [f"{kind} ×{self.counts[kind]} ({self.bytes[kind] / 2**20:.2f} MiB)"
             for kind in KINDS if kind in self.counts]
    return f"{self.loop}: " + ", ".join(parts) + " per iteration"


def _array_bytes(text: str, hbm_only: bool = False) -> list[int]:
  sizes = []
  for dtype, dims, layout in _ARRAY.findall(text):
    if dtype in _BYTES and not (hbm_only and _ON_CHIP.search(layout)):
      sizes.append(math.prod(int(d) for d in dims.split(",") if d) * _BYTES[dtype])
  return sizes


def _collective_bytes(opcode: str, result_type: str) -> int:
  sizes = _array_bytes(result_type)
  if opcode.endswith("-start") and len(sizes) > 1:
    half = len(sizes) // 2  # (operands…, results…): the larger half is what moves
    return max(sum(sizes[:half]), sum(sizes[half:]))
  return sum(sizes)


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  type: str  # the result type's text, e.g. "bf16[8,128]{1,0}" or a tuple "(s32[], …)"
  opcode: str
  arguments: str  # the text between the opcode's parentheses
  attributes: str  # the text after them

  @property
  def operands(self) -> list[str]:
    return _NAME.findall(self.arguments)


@dataclasses.dataclass
class Computation:
  instructions: dict[str, Instruction]  # in program order
  root: str = ""
  users: dict[str, list[Instruction]] = dataclasses.field(default_factory=dict)

  def __getitem__(self, name: str) -> Instruction:
    return self.instructions[name]


@dataclasses.dataclass(frozen=True)
class Module:
  computations: dict[str, Computation]
  entry: str
  # Collective channel → the instructions that carry it. More than one: TPU's async collective
  # fusion splits one collective over a start, continuation and done fusion, each holding a copy.
  copies: dict[str, int] = dataclasses.field(default_factory=dict)


def _split_call(rest: str) -> tuple[str, str]:
  """(the arguments, the attributes) of the text after an opcode's opening parenthesis."""
  depth = 1
  for i, char in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      return rest[:i], rest[i + 1:]
  return rest, ""


def parse(hlo_text: str) -> Module:
  """An HLO module's text as its computations' instructions."""
  computations: dict[str, Computation] = {}
  entry, current = "", None
  for line in hlo_text.splitlines():
    if current is None:
      match = _COMPUTATION.match(line)
      if match:
        current = computations[match.group(2)] = Computation({})
        entry = match.group(2) if match.group(1) else entry
    elif line.strip() == "}":
      current = None
    elif match := _INSTRUCTION.match(line):
      root, name, result_type, opcode, rest = match.groups()
      arguments, attributes = _split_call(rest)
      instruction = Instruction(name, result_type, opcode, arguments, attributes)
      current.instructions[name] = instruction
      current.root = name if root else current.root
      for operand in instruction.operands:
        current.users.setdefault(operand, []).append(instruction)
  copies: dict[str, int] = {}
  for computation in computations.values():
    for instruction in computation.instructions.values():
      if channel := _channel(instruction):
        copies[channel] = copies.get(channel, 0) + 1
  return Module(computations, entry, copies)


def _channel(instruction: Instruction) -> str | None:
  """A collective's channel id (None for any other op, or a collective without one)."""
  if instruction.opcode.removesuffix("-start") not in KINDS:
    return None
  channel = _CHANNEL.search(instruction.attributes)
  return channel.group(1) if channel else None


_SUFFIX = re.compile(r"\.\d+$")


def kernels(hlo: str | Module) -> dict[str, int]:
  """The Pallas (Mosaic) kernels a TPU module calls: kernel name → call sites in the program
  (e.g. `splash_mha_fwd_segmented_no_residuals`), in the order they first appear."""
  module = parse(hlo) if isinstance(hlo, str) else hlo
  found: dict[str, int] = {}
  for computation in module.computations.values():
    for instruction in computation.instructions.values():
      if (instruction.opcode == "custom-call"
          and 'custom_call_target="tpu_custom_call"' in instruction.attributes):
        name = _SUFFIX.sub("", instruction.name)
        found[name] = found.get(name, 0) + 1
  return found


def _callees(instruction: Instruction) -> list[str]:
  rest = instruction.attributes
  return _CALLED.findall(rest) + [c.strip().lstrip("%") for b in _BRANCHES.findall(rest)
                                  for c in b.split(",")]


def loop_collectives(hlo: str | Module) -> list[LoopCollectives]:
  """Every `while` loop of an HLO module (its text, or parsed), in the order they appear, with the
  collectives run per iteration of its body."""
  module = parse(hlo) if isinstance(hlo, str) else hlo

  def walk(name: str, counts: dict[str, int], sizes: dict[str, int], seen: set[str]) -> None:
    """Adds the collectives of computation `name` and its callees, stopping at nested loops."""
    if name in seen or name not in module.computations:
      return
    seen.add(name)
    for instruction in module.computations[name].instructions.values():
      opcode = instruction.opcode
      kind = opcode.removesuffix("-start")
      channel = _channel(instruction)
      # A collective that TPU's async collective fusion split over several fusions counts once.
      if kind in KINDS and not opcode.endswith("-done") and ("channel", channel) not in seen:
        counts[kind] = counts.get(kind, 0) + 1
        sizes[kind] = sizes.get(kind, 0) + _collective_bytes(opcode, instruction.type)
        if channel:
          seen.add(("channel", channel))
      if opcode == "while":
        continue  # a nested loop: its own entry
      for callee in _callees(instruction):
        walk(callee, counts, sizes, seen)

  loops = []
  for computation in module.computations.values():
    for instruction in computation.instructions.values():
      if instruction.opcode != "while":
        continue
      body = re.search(r"\bbody=%([\w.\-]+)", instruction.attributes)
      op_name = _OP_NAME.search(instruction.attributes)
      counts: dict[str, int] = {}
      sizes: dict[str, int] = {}
      if body:
        walk(body.group(1), counts, sizes, set())
      loops.append(LoopCollectives(loop=op_name.group(1) if op_name else "while",
                                   counts=counts, bytes=sizes))
  return loops


# ------------------------------------------------------------------------------------------------
# What one run costs.


@dataclasses.dataclass(frozen=True)
class Cost:
  """One run of a program, per device."""

  flops: float  # of its dots and convolutions (elementwise work is left out)
  bytes: float  # read and written by its top-level ops (a fusion: its operands and results)
  assumed_loops: int = 0  # loops whose trip count the HLO does not say (see program_cost)

  def __add__(self, other: Cost) -> Cost:
    return Cost(self.flops + other.flops, self.bytes + other.bytes,
                self.assumed_loops + other.assumed_loops)

  def __mul__(self, times: int) -> Cost:
    return Cost(self.flops * times, self.bytes * times, self.assumed_loops)


def _shape(array_type: str) -> list[int]:
  match = _ARRAY.search(array_type)
  return [int(d) for d in match.group(2).split(",") if d] if match else []


def _bytes(result_type: str) -> int:
  """HBM bytes of a type's arrays (those the layout places on chip cost none)."""
  return sum(_array_bytes(result_type, hbm_only=True))


def _dims(attributes: str, key: str) -> list[int]:
  match = re.search(key + r"=\{([\d,]*)\}", attributes)
  return [int(d) for d in match.group(1).split(",") if d] if match else []


def _window_field(window: str, key: str, dims: int, default: int) -> list[int]:
  match = re.search(r"\b" + key + r"=([\d_x\-]+)", window)
  return [int(v.split("_")[0]) for v in match.group(1).split("x")] if match else [default] * dims


def _real_taps(n: int, out: int, size: int, stride: int, low: int, lhs_dilate: int,
               rhs_dilate: int) -> int:
  """(output position, window tap) pairs of one spatial dimension that land on an input element,
  not on padding or between dilated elements."""
  where = (np.arange(out)[:, None] * stride + np.arange(size)[None, :] * rhs_dilate - low)
  return int(np.sum((where >= 0) & (where <= (n - 1) * lhs_dilate) & (where % lhs_dilate == 0)))


def _convolution_flops(instruction: Instruction, computation: Computation) -> float:
  """2 × (output batch × features) × input features × the real (output, tap) pairs of every
  spatial dimension. TPU writes dots as convolutions, some with windows mostly over padding or
  dilation holes (a batched dot: a window of B taps over an input dilated by B, one tap real; a
  head split: a 7-tap window over one input padded by 6): those taps multiply nothing."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instruction.attributes)
  lhs = _shape(computation[instruction.operands[0]].type)
  rhs = _shape(computation[instruction.operands[1]].type)
  out = _shape(instruction.type)
  lhs_labels, rhs_labels, out_labels = labels.groups()
  spatial = sorted(int(c) for c in out_labels if c.isdigit())
  window = re.search(r"window=\{([^}]*)\}", instruction.attributes)
  text = window.group(1) if window else ""
  n = len(spatial)
  size = _window_field(text, "size", n, 1)
  stride = _window_field(text, "stride", n, 1)
  low = _window_field(text, "pad", n, 0)
  lhs_dilate = _window_field(text, "lhs_dilate", n, 1)
  rhs_dilate = _window_field(text, "rhs_dilate", n, 1)
  pairs, positions = 1, 1
  for k in spatial:
    o = out[out_labels.index(str(k))]
    positions *= o
    pairs *= _real_taps(lhs[lhs_labels.index(str(k))], o, size[k], stride[k], low[k],
                        lhs_dilate[k], rhs_dilate[k])
  return 2.0 * (math.prod(out) // positions) * rhs[rhs_labels.index("i")] * pairs


def _flops(instruction: Instruction, computation: Computation) -> float:
  """2 × output elements × the length of each one's dot product."""
  if instruction.opcode == "dot":
    lhs = _shape(computation[instruction.operands[0]].type)
    inner = math.prod([lhs[d] for d in _dims(instruction.attributes, "lhs_contracting_dims")])
  elif instruction.opcode == "convolution":  # TPU writes dots as convolutions
    return _convolution_flops(instruction, computation)
  else:
    return 0.0
  return 2.0 * math.prod(_shape(instruction.type)) * inner


def _read_bytes(module: Module, computation: Computation, name: str, full: int) -> int:
  """Bytes a fusion reads of its operand `name` (a parameter of `computation`): only the slices
  when it only slices it (a scan reading its layer of the stacked weights), nothing where it only
  updates it in place."""
  if name == computation.root:  # passed out whole (a bitcast fusion): its reader reads it all
    return full
  total = 0
  for user in computation.users.get(name, []):
    if user.opcode in _SLICES and user.operands[0] == name:
      total += _bytes(user.type)
    elif user.opcode in KINDS:  # one collective reads it once, however many copies carry it
      total += full // _copies(module, user)
    elif user.opcode == "dynamic-update-slice" and user.operands[0] == name:
      continue
    elif user.opcode == "tuple" and user.name == computation.root:
      continue  # returned as it came (aliased): its reader reads it
    elif user.opcode == "bitcast":
      total += _read_bytes(module, computation, user.name, full)
    elif user.opcode == "fusion":
      callee = module.computations[_callees(user)[0]]
      params = _parameters(callee)
      total += sum(_read_bytes(module, callee, params[i], full)
                   for i, operand in enumerate(user.operands) if operand == name)
    else:
      return full
  return min(total, full)


def _parameters(computation: Computation) -> dict[int, str]:
  return {int(i.arguments): i.name for i in computation.instructions.values()
          if i.opcode == "parameter"}


def _written_bytes(module: Module, computation: Computation, name: str) -> int:
  """Bytes a fusion writes for its result `name`: an in-place update writes only the update."""
  instruction = computation[name]
  if instruction.opcode == "bitcast":
    return _written_bytes(module, computation, instruction.operands[0])
  if instruction.opcode == "dynamic-update-slice":
    return _bytes(computation[instruction.operands[1]].type)
  if instruction.opcode == "tuple":  # less the parameters returned as they came (aliased)
    return sum(_written_bytes(module, computation, o) for o in instruction.operands
               if computation[o].opcode != "parameter")
  if instruction.opcode == "fusion":
    callee = module.computations[_callees(instruction)[0]]
    return _written_bytes(module, callee, callee.root)
  return _bytes(instruction.type) // _copies(module, instruction)


def _copies(module: Module, instruction: Instruction) -> int:
  """How many instructions carry `instruction`'s collective (1 for any other op)."""
  channel = _channel(instruction)
  return module.copies.get(channel, 1) if channel else 1


def _window_bytes(window: int, source: str, result: str) -> int:
  """A slice moves its window, not its source: read from the source's memory and written to the
  result's, each counted where it is HBM (types or layouts; on chip: S(1), S(2))."""
  return window * sum(not _ON_CHIP.search(where) for where in (source, result))


def _op_bytes(module: Module, computation: Computation, instruction: Instruction) -> int:
  opcode = instruction.opcode
  if opcode in _FREE or opcode.endswith(("-done", "-update")) or (
      opcode == "async-start" and _callees(instruction)):
    return 0
  if opcode == "fusion":
    callee = module.computations[_callees(instruction)[0]]
    params = _parameters(callee)
    read = sum(_read_bytes(module, callee, params[i], _bytes(computation[o].type))
               for i, o in enumerate(instruction.operands) if o in computation.instructions)
    return read + _written_bytes(module, callee, callee.root)
  if opcode in _SLICES:  # also the dump's async slice: a `slice` inside an async computation
    source = computation.instructions.get(instruction.operands[0])
    return _window_bytes(sum(_array_bytes(instruction.type)),
                         "" if source is None else source.type, instruction.type)
  if opcode == "dynamic-update-slice":
    return 2 * _bytes(computation[instruction.operands[1]].type)
  if opcode == "slice-start":  # ((source), window[, context]): as_text()'s async slice
    return _window_bytes(_array_bytes(instruction.type)[1],
                         *(layout for *_, layout in _ARRAY.findall(instruction.type)[:2]))
  if opcode.endswith("-start"):  # (operands…, results…[, context]): what of it is in HBM
    return _bytes(instruction.type)
  return _bytes(instruction.type) + sum(_bytes(computation[o].type) for o in instruction.operands
                                        if o in computation.instructions)


def _constant(computation: Computation, name: str) -> int | None:
  instruction = computation.instructions.get(name)
  if instruction is None:
    return None
  if instruction.opcode == "copy":
    return _constant(computation, instruction.operands[0])
  if instruction.opcode == "constant" and instruction.arguments.lstrip("-").isdigit():
    return int(instruction.arguments)
  return None


def _trip_count(module: Module, loop: Instruction) -> int | None:
  """The iterations of a `while`: XLA's known trip count, or N of a condition `i < N`."""
  if match := _TRIP_COUNT.search(loop.attributes):
    return int(match.group(1))
  condition = re.search(r"\bcondition=%([\w.\-]+)", loop.attributes)
  computation = module.computations[condition.group(1)]
  root = computation[computation.root]
  if root.opcode == "fusion":  # CPU wraps the compare: follow the bound into the caller's operand
    callee = module.computations[_callees(root)[0]]
    compare = callee[callee.root]
    if compare.opcode != "compare" or "direction=LT" not in compare.attributes:
      return None
    bound = _constant(callee, compare.operands[1])
    if bound is None and callee[compare.operands[1]].opcode == "parameter":
      bound = _constant(computation,
                        root.operands[int(callee[compare.operands[1]].arguments)])
    return bound
  if root.opcode == "compare" and "direction=LT" in root.attributes:
    return _constant(computation, root.operands[1])
  return None


def program_cost(hlo: str | Module, unknown_trips: int = 1) -> Cost:
  """Matmul FLOPs and HBM bytes of one run of a compiled (SPMD-partitioned) module (its HLO text,
  or parsed), per device.

  Each while loop's body and condition count once per iteration, loops inside loops multiply; a
  loop whose trip count the HLO does not give (one that stops on data) counts `unknown_trips` when
  its body multiplies (the decode loop: a model step per token) and once when it does not (a
  retry, such as top-p's redraw, which mostly ends after its first round). A conditional counts
  its dearest branch. Bytes are those of the top-level ops (a fusion reads its operands, less what
  it only slices or updates in place, and writes its results); a custom call (a Pallas kernel)
  counts its operands and results but not its FLOPs, which XLA cannot see.
  """
  module = parse(hlo) if isinstance(hlo, str) else hlo
  memo: dict[tuple[str, bool], Cost] = {}

  def cost(name: str, top: bool) -> Cost:
    """Of computation `name`; `top`: it runs ops on HBM (not a fusion's inside)."""
    if (name, top) in memo:
      return memo[name, top]
    computation = module.computations[name]
    total = Cost(0.0, 0.0)
    for instruction in computation.instructions.values():
      total += Cost(_flops(instruction, computation),
                    float(_op_bytes(module, computation, instruction)) if top else 0.0)
      callees = _callees(instruction)
      if instruction.opcode == "while":
        trips = _trip_count(module, instruction)
        body = sum((cost(c, top) for c in callees), Cost(0.0, 0.0))
        total += body * (trips or (unknown_trips if body.flops else 1))
        total += Cost(0.0, 0.0, assumed_loops=int(trips is None))
      elif instruction.opcode == "conditional":
        branches = [cost(c, top) for c in callees]
        total += Cost(max(b.flops for b in branches), max(b.bytes for b in branches),
                      max(b.assumed_loops for b in branches))
      elif instruction.opcode == "fusion":  # its FLOPs; its bytes are the fusion op's own
        total += cost(callees[0], False)
      elif instruction.opcode in ("call", "async-start") or (
          instruction.opcode == "custom-call" and callees):
        total += sum((cost(c, top) for c in callees), Cost(0.0, 0.0))
    memo[name, top] = total
    return total

  return cost(module.entry, True)
