"""`python -m robot_r1_jax.export`: a trained run → a directory transformers loads as our model."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from robot_r1_jax.model import config as model_config
from robot_r1_jax.model import processor
from robot_r1_jax.model.qwen2_5_vl import init_model
from robot_r1_jax.train.checkpoint import restore_params

from hf_reference import hf_logits

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained_run(extracted_data, tmp_path_factory) -> pathlib.Path:
  """Two SFT steps of the tiny model at a high learning rate: parameters far from the init."""
  run = tmp_path_factory.mktemp("run")
  proc = _run("robot_r1_jax.launch", f"--workdir={run}", f"--data={extracted_data}",
              "--stage=sft", "--model=tiny", "--sft_steps=2", "--sft_batch_size=4",
              "--sft_learning_rate=1e-2", "--checkpoint_every=1", "--temperature=0.7",
              "--top_p=0.9")
  assert proc.returncode == 0, proc.stderr[-4000:]
  return run


def test_export_loads_in_transformers_with_the_same_logits(trained_run, tmp_path):
  out = tmp_path / "hf"
  proc = _run("robot_r1_jax.export", f"--run={trained_run}", f"--out={out}", "--max_shard_mb=1")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "exported step 2" in proc.stdout
  for name in ("config.json", "model.safetensors.index.json", "model-00001-of-00003.safetensors",
               "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
               "generation_config.json"):
    assert (out / name).exists(), name
    assert (out / name).stat().st_mode & 0o044 == 0o044, name  # readable by a colleague
  generation = json.loads((out / "generation_config.json").read_text())
  assert generation["do_sample"] and generation["temperature"] == 0.7 and generation["top_p"] == 0.9

  cfg = model_config.PRESETS["tiny"]()
  ours = init_model(cfg, seed=0)
  params = lambda: [np.asarray(x) for x in jax.tree.leaves(nnx.state(ours, nnx.Param))]
  initial = params()
  assert restore_params(ours, trained_run) == 2
  assert not all(np.allclose(a, b) for a, b in zip(initial, params()))  # trained

  # The exported image processor and tokenizer (with its chat template), as transformers loads
  # them, make the inputs we train on. (AutoProcessor would also load the video processor, which
  # needs torchvision; vLLM installs it, the tests do not.)
  image = np.random.default_rng(0).integers(0, 256, (84, 112, 3), np.uint8)
  images = transformers.AutoImageProcessor.from_pretrained(out, use_fast=False)(
      images=[image], return_tensors="np")
  pixels, grid = processor.preprocess_image(image)
  np.testing.assert_array_equal(images["image_grid_thw"][0], grid)
  np.testing.assert_allclose(images["pixel_values"], pixels, atol=1e-5)
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  messages = [{"role": "user", "content": [{"type": "image"},
                                           {"type": "text", "text": "Where is the button?"}]}]
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  text = text.replace("<|image_pad|>", "<|image_pad|>" * processor.image_token_count(grid))
  ids = np.asarray([tokenizer(text)["input_ids"]], np.int64)
  np.testing.assert_array_equal(
      ids[0], processor.build_prompt_ids(processor.load_tokenizer(), "Where is the button?", grid))

  hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      out, attn_implementation="eager").eval()
  mask, pv = np.ones_like(ids), images["pixel_values"].astype(np.float32)
  grid = images["image_grid_thw"]
  np.testing.assert_allclose(hf_logits(hf, ids, mask, pv, grid),
                             np.asarray(ours(ids, mask, pv, grid)), atol=1e-5)


def test_bad_run_or_step_is_one_line(trained_run, tmp_path):
  proc = _run("robot_r1_jax.export", f"--run={tmp_path / 'nothing'}", f"--out={tmp_path / 'o'}")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: no checkpoint under")
  proc = _run("robot_r1_jax.export", f"--run={trained_run}", f"--out={tmp_path / 'o'}",
              "--step=7")
  assert proc.returncode == 1 and "step 7 is not a complete checkpoint" in proc.stderr
  assert not (tmp_path / "o").exists()


def test_export_to_a_bucket(trained_run, gcs_bucket):
  from etils import epath
  out = epath.Path(gcs_bucket) / "exported"
  proc = _run("robot_r1_jax.export", f"--run={trained_run}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-4000:]
  names = {p.name for p in out.iterdir()}
  assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
          "preprocessor_config.json"} <= names
  assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_5_vl"

