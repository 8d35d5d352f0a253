"""What the benchmarks print about the machine they ran on (figures are only comparable on one)."""

from __future__ import annotations

import platform


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
  try:
    for line in open("/proc/cpuinfo", encoding="utf-8"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
