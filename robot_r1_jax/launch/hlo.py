"""Collectives inside the loops of a compiled program, read from its optimised HLO text.

A collective in a loop body runs once per iteration: an FSDP all-gather of the weights inside a
decode loop moves the whole model once per generated token. `loop_collectives` finds every
`while` of a compiled (SPMD-partitioned) module and, per loop, the collectives its body runs per
iteration — in the body and in what it calls, but not in a nested loop's body, which is reported
as a loop of its own. Sizes are per device: the bytes of each op's result (for an all-gather the
gathered array; for an async `-start` op the larger half of its operand/result tuple).
"""

from __future__ import annotations

import dataclasses
import re

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
          "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
          "c64": 8, "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (.+?) ([a-z][a-z0-9\-]*)\((.*)$")
_CALLED = re.compile(r"\b(?:condition|body|to_apply|calls|true_computation|false_computation)"
                     r"=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


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


def _array_bytes(text: str) -> list[int]:
  sizes = []
  for dtype, dims in _ARRAY.findall(text):
    if dtype in _BYTES:
      n = 1
      for d in filter(None, dims.split(",")):
        n *= int(d)
      sizes.append(n * _BYTES[dtype])
  return sizes


def _collective_bytes(opcode: str, result_type: str) -> int:
  sizes = _array_bytes(result_type)
  if opcode.endswith("-start") and len(sizes) > 1:
    half = len(sizes) // 2  # (operands…, results…): the larger half is what moves
    return max(sum(sizes[:half]), sum(sizes[half:]))
  return sum(sizes)


def loop_collectives(hlo_text: str) -> list[LoopCollectives]:
  """Every `while` loop of an HLO module's text, in the order they appear, with the collectives
  run per iteration of its body."""
  computations: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    if current is None:
      match = _COMPUTATION.match(line)
      if match:
        current = match.group(1)
        computations[current] = []
    elif line.strip() == "}":
      current = None
    else:
      computations[current].append(line)

  def walk(name: str, counts: dict[str, int], sizes: dict[str, int], seen: set[str]) -> None:
    """Adds the collectives of computation `name` and its callees, stopping at nested loops."""
    if name in seen or name not in computations:
      return
    seen.add(name)
    for line in computations[name]:
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      result_type, opcode, rest = match.groups()
      kind = opcode.removesuffix("-start")
      if kind in KINDS and not opcode.endswith("-done"):
        counts[kind] = counts.get(kind, 0) + 1
        sizes[kind] = sizes.get(kind, 0) + _collective_bytes(opcode, result_type)
      if opcode == "while":
        continue  # a nested loop: its own entry
      for callee in _CALLED.findall(rest) + [c.strip().lstrip("%") for b in
                                             _BRANCHES.findall(rest) for c in b.split(",")]:
        walk(callee, counts, sizes, seen)

  loops = []
  for lines in computations.values():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match or match.group(2) != "while":
        continue
      body = re.search(r"\bbody=%([\w.\-]+)", match.group(3))
      op_name = _OP_NAME.search(match.group(3))
      counts: dict[str, int] = {}
      sizes: dict[str, int] = {}
      if body:
        walk(body.group(1), counts, sizes, set())
      loops.append(LoopCollectives(loop=op_name.group(1) if op_name else "while",
                                   counts=counts, bytes=sizes))
  return loops
