"""Builders of a run's parts from its typed config: the default data, the model, the tokenizer."""

from __future__ import annotations

import logging
import pathlib
import sys

import jax
import jax.numpy as jnp
from etils import epath
from jax.sharding import Mesh

from robot_r1_jax.data import atomic, extract, records
from robot_r1_jax.data.mcqa import McqaConfig
from robot_r1_jax.launch.config import DataSpec, ModelSpec
from robot_r1_jax.model import config as model_config
from robot_r1_jax.model import hf_io, processor
from robot_r1_jax.model.qwen2_5_vl import Qwen25VL, init_model


class InputError(ValueError):
  """A flag points at something unusable; the message names the flag, the file and what to do."""


def data_dir(spec: DataSpec, default_dir: epath.Path, seed: int) -> pathlib.Path:
  """`spec.path` (checked to be extractor output), else the default data under `default_dir`
  (made once)."""
  if spec.path is None:
    if atomic.is_remote(default_dir):
      raise InputError(f"--workdir on object storage needs --data: the default data would be "
                       f"simulated into {default_dir}, which the loader cannot read from there; "
                       "extract it locally (python -m robot_r1_jax.data.extract) and pass --data")
    return ensure_default_data(pathlib.Path(default_dir), spec, seed)
  extract_cmd = "python -m robot_r1_jax.data.extract --demos DEMOS --out DIR"
  if not spec.path.is_dir():
    raise InputError(f"--data={spec.path}: no such directory; give the folder `{extract_cmd}` "
                     "wrote, or leave --data out for the simulated default data")
  if not (spec.path / records.MANIFEST).exists():
    hint = (" (it looks like RLBench demos: extract them first)"
            if any(spec.path.glob("*/variation*")) or any(spec.path.glob("*/all_variations"))
            else "")
    raise InputError(f"--data={spec.path} has no {records.MANIFEST}: not extractor output"
                     f"{hint}; make it with `{extract_cmd}`")
  try:
    records.Manifest.load(spec.path)
  except ValueError as e:
    raise InputError(f"--data: {e}; extract the demos again") from None
  return spec.path


def ensure_default_data(out_dir: pathlib.Path, spec: DataSpec, seed: int) -> pathlib.Path:
  """Simulated demos extracted into questions under `out_dir`, made once (process 0 writes).

  A third of each task's episodes go to val, so even two episodes per task leave one to evaluate.
  """
  from robot_r1_jax.data import sim  # pybullet is optional: only the default data needs it

  questions = McqaConfig(prompt_style=spec.prompt_style, answer_format=spec.answer_format)
  if (out_dir / "extracted" / "manifest.json").exists():
    made = records.Manifest.load(out_dir / "extracted").questions
    differ = {k: getattr(made, k) for k in ("prompt_style", "answer_format")
              if getattr(made, k) != getattr(questions, k)}
    if differ:
      raise InputError(f"{out_dir} holds the default data made with "
                       + ", ".join(f"--{k}={v}" for k, v in differ.items())
                       + "; pass those flags, or another --workdir for new data")
    return out_dir / "extracted"
  if jax.process_index() == 0:
    demos = out_dir / "demos"
    logging.info("simulating %d episodes of %s into %s", spec.sim_episodes, spec.sim_tasks, demos)
    # tqdm bars only on a terminal: in a log file their redraws are one long line.
    bars = sys.stderr.isatty()
    sim.generate(demos, list(spec.sim_tasks), spec.sim_episodes, seed=seed, progress=bars,
                 config=sim.RenderConfig(image_size=spec.image_size, cameras=("front",)))
    manifest = extract.extract(
        demos, out_dir / "extracted",
        extract.ExtractConfig(image_size=spec.image_size, seed=seed, val_fraction=0.34,
                              progress=bars, mcqa=questions))
    logging.info("extracted %s questions into %s", " / ".join(
        f"{info.num_records} {name}" for name, info in manifest.splits.items()),
                 out_dir / "extracted")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("default data ready")
  return out_dir / "extracted"


def build_model(spec: ModelSpec, *, mesh: Mesh, seed: int
                ) -> tuple[model_config.ModelConfig, Qwen25VL, pathlib.Path | None]:
  """A preset at random (seeded) or a local Hugging Face directory; parameters on the mesh."""
  dtype = jnp.bfloat16 if spec.compute_dtype == "bfloat16" else jnp.float32
  if spec.name in model_config.PRESETS:
    cfg = model_config.PRESETS[spec.name]()
    return cfg, init_model(cfg, seed=seed, dtype=dtype, remat=spec.remat,
                           attention_implementation=spec.attention, mesh=mesh), None
  path = pathlib.Path(spec.name)
  if not (path / "config.json").exists():
    raise InputError(f"--model={spec.name!r} is neither a preset "
                     f"({', '.join(model_config.PRESETS)}) nor a directory with config.json")
  cfg, model = hf_io.load_hf(path, dtype=dtype, mesh=mesh, remat=spec.remat,
                             attention_implementation=spec.attention)
  return cfg, model, path


def load_tokenizer(flag: str | None, model_dir: pathlib.Path | None):
  """--tokenizer, else the model directory's tokenizer, else the packaged tiny one."""
  if flag:
    return processor.load_tokenizer(flag), flag
  if model_dir is not None and (model_dir / "tokenizer_config.json").exists():
    return processor.load_tokenizer(model_dir), str(model_dir)
  return processor.load_tokenizer(None), None
