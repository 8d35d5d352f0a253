"""generate/batching.py: which prompts a compaction keeps whole."""

from __future__ import annotations

import numpy as np

from robot_r1_jax.generate.batching import whole_groups


def _done(*prompts: str) -> np.ndarray:
  """One string per prompt, a character per row: "x" finished, "." live."""
  return np.array([c == "x" for p in prompts for c in p])


def test_live_prompts_then_finished_ones_fill_the_size():
  done = _done("xxx", "...", "xxx", "...", "xxx", "xxx")
  np.testing.assert_array_equal(whole_groups(done, 12, 3, 1), [1, 3, 0, 2])
  np.testing.assert_array_equal(whole_groups(done, 6, 3, 2), [1, 3])


def test_no_whole_groups_when_a_live_prompt_has_finished_rows_or_sizes_split_prompts():
  assert whole_groups(_done("x..", "...", "xxx", "xxx"), 6, 3, 1) is None  # prompt 0 half done
  done = _done("...", "xxx", "...", "xxx")
  assert whole_groups(done, 8, 3, 1) is None  # 8 rows are not whole prompts of 3
  assert whole_groups(done, 6, 3, 4) is None  # 2 prompts over 4 data-parallel groups
