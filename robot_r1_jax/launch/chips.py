"""Accelerator chips' data-sheet figures: HBM per chip, peak dense bf16 FLOP/s, HBM bandwidth.

The compile report sets a program's memory against `hbm_bytes` and its FLOPs and bytes against
the two rates (a roofline); bench/accelerator.py divides measured times by the same rates.
"""

from __future__ import annotations

import dataclasses

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  device_kind: str  # as jax.Device.device_kind names it
  hbm_bytes: int
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bandwidth: float  # bytes/s


# By the name a topology starts with (v5e:4x4). HBM per chip, not per core: a v4 chip's two
# cores are one megacore device here.
TPUS = {"v4": Chip("TPU v4", 32 * GIB, 275e12, 1.2e12),
        "v5e": Chip("TPU v5 lite", 16 * GIB, 197e12, 0.82e12),
        "v5p": Chip("TPU v5", 95 * GIB, 459e12, 2.76e12),
        "v6e": Chip("TPU v6 lite", 32 * GIB, 918e12, 1.64e12)}
GPUS = (Chip("H100", 80 * 10**9, 989e12, 3.35e12), Chip("H200", 141 * 10**9, 989e12, 4.8e12),
        Chip("A100", 80 * 10**9, 312e12, 2.0e12))


def by_device_kind(kind: str) -> Chip | None:
  """The chip whose name `kind` contains, the longest such name ("TPU v5 lite" before "TPU v5");
  None for a kind not in the tables."""
  known = sorted((*TPUS.values(), *GPUS), key=lambda chip: -len(chip.device_kind))
  return next((chip for chip in known if chip.device_kind in kind), None)
