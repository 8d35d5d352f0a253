"""rollouts.html from a real RL run, rendered by headless Chromium (Debian's `chromium`)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("pybullet")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (.ci/run installs it)")

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(extracted_data, tmp_path_factory) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp("viewer")
  proc = subprocess.run(
      [sys.executable, "-m", "robot_r1_jax.launch", f"--workdir={workdir}",
       f"--data={extracted_data}", "--stage=rl", "--model=tiny", "--num_generations=3",
       "--rollout_batch_size=2", "--train_batch_size=2", "--micro_batch_size=3",
       "--max_new_tokens=16", "--max_steps=2"],
      env=dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=""), cwd=ROOT, capture_output=True,
      text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir


def _render(page: pathlib.Path, fragment: str = "") -> tuple[str, list[str]]:
  """The DOM after scripts ran and images settled, and the page's console messages."""
  proc = subprocess.run(
      [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
       "--v=0", "--virtual-time-budget=5000", "--dump-dom", page.as_uri() + fragment],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


def test_viewer_shows_every_rollout_with_its_image(run):
  rows = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
  assert len(rows) == 2 * 2 * 3 and {r["sample"] for r in rows} == {0, 1, 2}
  assert {"record_index", "task", "format_reward", "answer_reward", "advantage"} <= set(rows[0])

  dom, console = _render(run / "rollouts.html")
  assert console == []  # no errors, no messages
  # The newest step by default: its 2 prompts, each with its image and its 3 completions.
  assert re.search(r'data-images="2"', dom) and re.search(r'data-images-loaded="2"', dom), dom[:500]
  assert len(re.findall(r'<tr class="rollout', dom)) == 6
  assert len(re.findall(r'<section class="prompt"', dom)) == 2
  assert dom.count('class="right"') == 2  # each question's right option is marked

  dom, console = _render(run / "rollouts.html", "#step=(all)")
  assert console == [] and len(re.findall(r'<tr class="rollout', dom)) == 12
  kind = rows[0]["question_type"]
  dom, _ = _render(run / "rollouts.html", f"#step=(all)&type={kind}")
  assert len(re.findall(r'<tr class="rollout', dom)) == sum(r["question_type"] == kind
                                                            for r in rows)
