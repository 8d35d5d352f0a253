"""A trained run as a Hugging Face directory that transformers, vLLM or a colleague loads.

    python -m robot_r1_jax.export --run=workdir --out=hf_model [--step=N] [--dtype=bfloat16]

writes into `out`:

    config.json                          the Qwen2.5-VL config (`model_type: qwen2_5_vl`)
    model.safetensors | model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer.json, tokenizer_config.json, chat_template (as the tokenizer saves it)
    preprocessor_config.json             the image processor the model was trained with
    generation_config.json               end tokens and the run's sampling settings

The run's checkpoint meta says which model it trained (`--model`: a preset or a Hugging Face
directory) and which tokenizer; only the parameters are read from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from robot_r1_jax.data import atomic
from robot_r1_jax.model import config as model_config
from robot_r1_jax.model import hf_io, processor
from robot_r1_jax.model.qwen2_5_vl import Qwen25VL
from robot_r1_jax.train.checkpoint import Checkpointer, CheckpointError, find_checkpoints

DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16}
_PROCESSOR_FILE = "preprocessor_config.json"


@dataclasses.dataclass(frozen=True)
class Exported:
  out: epath.Path
  checkpoints: epath.Path  # the folder the step came from
  step: int
  model: str  # the run's --model
  files: tuple[str, ...]


def export_run(run_dir: str | pathlib.Path, out_dir: str | pathlib.Path, *,
               step: int | None = None, dtype: str = "float32",
               max_shard_bytes: int = 2 << 30) -> Exported:
  """Writes `step` (default: the newest) of the run in `run_dir` as a Hugging Face directory.

  `run_dir` is a run (its newest stage is taken: rl, then sft), a stage directory, or a
  checkpoints folder; both it and `out_dir` may be on an object store (gs://…). `out_dir` is replaced atomically: on any error it is left as it was.
  Tensors go in safetensors files of at most `max_shard_bytes`, with an index when there are
  several.
  """
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r}: one of {', '.join(DTYPES)}")
  directory = find_checkpoints(run_dir)
  with Checkpointer(directory) as checkpoints:
    step = checkpoints.latest_step() if step is None else step
    flags = checkpoints.meta(step).get("config", {})
    name = flags.get("model")
    if not name:
      raise CheckpointError(f"step {step} in {directory} does not record the run's --model "
                            "(saved by an older version?)")
    cfg, model_dir = _model_config(name)
    # Abstract first (no random init), then the checkpoint's parameters on one device.
    model = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            nnx.state(model, nnx.Param))
    params = checkpoints.restore_part(step, abstract_part={"params": abstract})["params"]
  nnx.update(model, params)

  tokenizer_dir = flags.get("tokenizer") or (
      model_dir if model_dir and (model_dir / "tokenizer_config.json").exists() else None)
  tokenizer = processor.load_tokenizer(tokenizer_dir)

  def write(tmp: pathlib.Path) -> tuple[str, ...]:
    hf_io.save_hf(cfg, model, tmp, dtype=DTYPES[dtype], max_shard_bytes=max_shard_bytes)
    tokenizer.save_pretrained(str(tmp))
    if model_dir and (model_dir / _PROCESSOR_FILE).exists():
      shutil.copyfile(model_dir / _PROCESSOR_FILE, tmp / _PROCESSOR_FILE)
    else:
      (tmp / _PROCESSOR_FILE).write_text(json.dumps(image_processor_config(cfg), indent=2) + "\n")
    (tmp / "generation_config.json").write_text(
        json.dumps(generation_config(cfg, tokenizer, flags), indent=2) + "\n")
    return tuple(sorted(p.name for p in tmp.iterdir()))

  if atomic.is_remote(out_dir):  # written locally, then uploaded file by file
    out_dir = epath.Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
      files = write(pathlib.Path(tmp))
      out_dir.mkdir(parents=True, exist_ok=True)
      for name in files:
        (out_dir / name).write_bytes((pathlib.Path(tmp) / name).read_bytes())
  else:
    out_dir = epath.Path(out_dir)
    with atomic.directory(pathlib.Path(out_dir)) as tmp:
      files = write(tmp)
  return Exported(out=out_dir, checkpoints=directory, step=step, model=name, files=files)


def _model_config(name: str) -> tuple[model_config.ModelConfig, pathlib.Path | None]:
  if name in model_config.PRESETS:
    return model_config.PRESETS[name](), None
  path = pathlib.Path(name)
  if not (path / "config.json").exists():
    raise CheckpointError(f"the run trained --model={name!r}, which is neither a preset nor a "
                          "directory with config.json here; export needs its config")
  return hf_io.read_config(path), path


def image_processor_config(cfg: model_config.ModelConfig) -> dict[str, Any]:
  """`Qwen2VLImageProcessor`'s settings as `processor.preprocess_image` applies them."""
  return {
      "image_processor_type": "Qwen2VLImageProcessor",
      "processor_class": "Qwen2_5_VLProcessor",
      "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
      "do_normalize": True, "do_convert_rgb": True,
      "image_mean": list(processor.IMAGE_MEAN), "image_std": list(processor.IMAGE_STD),
      "min_pixels": processor.MIN_PIXELS, "max_pixels": processor.MAX_PIXELS,
      "patch_size": cfg.vision.patch_size,
      "temporal_patch_size": cfg.vision.temporal_patch_size,
      "merge_size": cfg.vision.spatial_merge_size,
  }


def generation_config(cfg: model_config.ModelConfig, tokenizer,
                      flags: dict[str, Any]) -> dict[str, Any]:
  """Stops at `<|im_end|>` or the end-of-text token; samples as the run's rollouts did."""
  end = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
  end.append(tokenizer.eos_token_id)
  temperature = float(flags.get("temperature", 1.0))
  config = {"bos_token_id": cfg.bos_token_id,
            "eos_token_id": sorted({t for t in end if t is not None}),
            "pad_token_id": tokenizer.pad_token_id, "do_sample": temperature > 0}
  if temperature > 0:
    config.update(temperature=temperature, top_p=float(flags.get("top_p", 1.0)))
  return config
