"""Builders that turn flag values into the run's parts: data, model, optimizer, sampler, learner."""

from __future__ import annotations

import logging
import pathlib

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from robot_r1_jax.data import extract
from robot_r1_jax.data.mcqa import McqaConfig
from robot_r1_jax.data.prompts import PAPER
from robot_r1_jax.model import config as model_config
from robot_r1_jax.model import hf_io, processor
from robot_r1_jax.model.qwen2_5_vl import Qwen25VL, init_model
from robot_r1_jax.train.checkpoint import Checkpointer


def ensure_default_data(out_dir: pathlib.Path, *, tasks: list[str], episodes: int,
                        image_size: int, seed: int, prompt_style: str = PAPER
                        ) -> pathlib.Path:
  """Simulated demos extracted into questions under `out_dir`, made once (process 0 writes).

  A third of each task's episodes go to val, so even two episodes per task leave one to evaluate.
  """
  from robot_r1_jax.data import sim  # pybullet is optional: only the default data needs it

  if (out_dir / "extracted" / "manifest.json").exists():
    return out_dir / "extracted"
  if jax.process_index() == 0:
    demos = out_dir / "demos"
    logging.info("simulating %d episodes of %s into %s", episodes, tasks, demos)
    sim.generate(demos, tasks, episodes, seed=seed,
                 config=sim.RenderConfig(image_size=image_size, cameras=("front",)))
    extract.extract(demos, out_dir / "extracted",
                    extract.ExtractConfig(image_size=image_size, seed=seed, val_fraction=0.34,
                                          mcqa=McqaConfig(prompt_style=prompt_style)))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("default data ready")
  return out_dir / "extracted"


def build_model(name: str, *, dtype: jnp.dtype, mesh: Mesh, seed: int, remat: bool
                ) -> tuple[model_config.ModelConfig, Qwen25VL, pathlib.Path | None]:
  """A preset at random (seeded) or a local Hugging Face directory; parameters on the mesh."""
  if name in model_config.PRESETS:
    cfg = model_config.PRESETS[name]()
    return cfg, init_model(cfg, seed=seed, dtype=dtype, remat=remat, mesh=mesh), None
  path = pathlib.Path(name)
  if not (path / "config.json").exists():
    raise ValueError(f"--model={name!r} is neither a preset ({', '.join(model_config.PRESETS)}) "
                     f"nor a directory with config.json")
  cfg, model = hf_io.load_hf(path, dtype=dtype, mesh=mesh, remat=remat)
  return cfg, model, path


def load_tokenizer(flag: str | None, model_dir: pathlib.Path | None):
  """--tokenizer, else the model directory's tokenizer, else the packaged tiny one."""
  if flag:
    return processor.load_tokenizer(flag), flag
  if model_dir is not None and (model_dir / "tokenizer_config.json").exists():
    return processor.load_tokenizer(model_dir), str(model_dir)
  return processor.load_tokenizer(None), None


def build_optimizer(*, learning_rate: float, schedule: str, warmup_steps: int, total_steps: int,
                    weight_decay: float, grad_clip: float
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW after global-norm clipping, with warm-up then constant/cosine/linear decay."""
  decay_steps = max(total_steps - warmup_steps, 1)
  after = {"constant": optax.constant_schedule(learning_rate),
           "cosine": optax.cosine_decay_schedule(learning_rate, decay_steps),
           "linear": optax.linear_schedule(learning_rate, 0.0, decay_steps)}[schedule]
  lr = (optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), after],
                             [warmup_steps]) if warmup_steps else after)
  return optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(lr, weight_decay=weight_decay)), lr


def restore_params(model: Qwen25VL, run_dir: pathlib.Path) -> int:
  """Loads the newest parameters saved under `run_dir` into `model`; returns their step.

  Looks in `run_dir/rl`, `run_dir`, `run_dir/sft` (an sft_rl run's stages, newest stage first) or
  `run_dir` as a checkpoints folder itself. The optimizer state saved beside them is dropped.
  """
  candidates = [run_dir / "rl" / "checkpoints", run_dir / "checkpoints",
                run_dir / "sft" / "checkpoints", run_dir]
  for directory in candidates:
    if not directory.is_dir():
      continue
    checkpoints = Checkpointer(directory)
    step = checkpoints.latest_step()
    if step is None:
      checkpoints.close()
      continue
    params = nnx.state(model, nnx.Param)
    # Every stage saves AdamW-after-clipping state of one structure (build_optimizer), so an
    # optimizer of any schedule describes it.
    optimizer, _ = build_optimizer(learning_rate=0.0, schedule="constant", warmup_steps=0,
                                   total_steps=1, weight_decay=0.0, grad_clip=1.0)
    state = {"params": params, "opt_state": jax.jit(optimizer.init)(params)}
    restored, _ = checkpoints.restore(step, abstract_state=state)
    checkpoints.close()
    nnx.update(model, restored["params"])
    return step
  raise FileNotFoundError(f"no checkpoint under {run_dir} (looked in "
                          f"{', '.join(str(c) for c in candidates)})")
