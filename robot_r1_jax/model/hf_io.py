"""Hugging Face checkpoints ↔ robot_r1_jax models (config.json + safetensors).

Loading streams tensor by tensor from memory-mapped safetensors into an abstract (`eval_shape`)
model, placing each parameter straight onto its sharding when a mesh is given, so a 7B checkpoint
never needs two full copies in host memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from robot_r1_jax.model import config as config_lib
from robot_r1_jax.model import attention, hf_names, sharding, text, vision
from robot_r1_jax.model.qwen2_5_vl import Qwen25VL, platform

# (language-model prefix, vision prefix) of the two on-disk name layouts.
HUB_LAYOUT = ("model.", "visual.")
TRANSFORMERS5_LAYOUT = ("model.language_model.", "model.visual.")
LM_HEAD = "lm_head.weight"


class _Checkpoint:
  """Lazy, memory-mapped access to the tensors of one or several safetensors files."""

  def __init__(self, path: Path):
    index = path / "model.safetensors.index.json"
    if index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
      files, weight_map = ["model.safetensors"], None
    else:
      raise FileNotFoundError(f"{path} has neither model.safetensors nor "
                              "model.safetensors.index.json")
    self._handles = {f: safe_open(str(path / f), framework="np") for f in files}
    self.where = weight_map or {k: files[0] for k in self._handles[files[0]].keys()}
    for f, handle in self._handles.items():
      missing = set(handle.keys()) - set(self.where)
      if missing:
        raise ValueError(f"{path / f} holds tensors absent from the index: {sorted(missing)}")

  def get(self, name: str) -> np.ndarray | None:
    f = self.where.get(name)
    return None if f is None else self._handles[f].get_tensor(name)


def _components(cfg: config_lib.ModelConfig, model: Qwen25VL, layout: tuple[str, str]):
  """(module, its rules, layer count, name prefix) for each component of the model."""
  text_prefix, vision_prefix = layout
  groups = [(model.text, text.hf_rules(cfg.text), cfg.text.num_layers, text_prefix),
            (model.vision, vision.hf_rules(cfg.vision), cfg.vision.depth, vision_prefix)]
  if not cfg.text.tie_word_embeddings:
    groups.append((model, [hf_names.dense(LM_HEAD, ("lm_head",), (cfg.text.hidden_size,),
                                          (cfg.text.vocab_size,))], 0, ""))
  return groups


def read_config(path: str | os.PathLike) -> config_lib.ModelConfig:
  """The model config of a Hugging Face directory's `config.json`; errors name the file."""
  config_file = Path(path) / "config.json"
  if not config_file.exists():
    raise FileNotFoundError(f"{config_file} not found: not a Hugging Face model directory")
  try:
    hf_config = json.loads(config_file.read_text())
  except json.JSONDecodeError as e:  # cut short by an interrupted download or copy, typically
    raise config_lib.ConfigError(
        f"{config_file} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); copy or "
        "download it again") from None
  try:
    return config_lib.from_hf_config(hf_config)
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f"{config_file}: {e}") from None


def load_hf(path: str | os.PathLike, dtype: jnp.dtype = jnp.float32,
            param_dtype: jnp.dtype = jnp.float32, mesh: Mesh | None = None,
            remat: bool = False, attention_implementation: str = "xla"
            ) -> tuple[config_lib.ModelConfig, Qwen25VL]:
  """Loads a local Hugging Face Qwen2.5-VL directory (config.json + safetensors).

  Accepts hub names (`model.*`, `visual.*`, `lm_head.weight`) and transformers-5 names
  (`model.language_model.*`, `model.visual.*`), tied and untied embeddings, single-file and sharded
  checkpoints. With a mesh, each parameter lands directly on its `sharding.RULES` placement;
  `attention_implementation` "auto" picks the one for the mesh's (or the default) devices.
  Raises `hf_names.ConversionError` naming every missing, unexpected or mis-shaped key.
  """
  path = Path(path)
  cfg = read_config(path)
  impl = attention.resolve(attention_implementation, platform(mesh))
  model = nnx.eval_shape(lambda: Qwen25VL(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                          attention_implementation=impl, rngs=nnx.Rngs(0)))
  ckpt = _Checkpoint(path)
  layout = (TRANSFORMERS5_LAYOUT if any(k.startswith(TRANSFORMERS5_LAYOUT[0]) for k in ckpt.where)
            else HUB_LAYOUT)
  def place(var: nnx.Variable, array: np.ndarray) -> jax.Array:
    if mesh is None:
      return jnp.asarray(array)
    return jax.device_put(array, sharding.variable_sharding(var, mesh))

  consumed: set[str] = set()
  problems = []
  for module, rules, num_layers, prefix in _components(cfg, model, layout):
    try:
      consumed |= set(hf_names.load_into(module, rules, ckpt.get,
                                         num_layers=num_layers, prefix=prefix, place=place))
    except hf_names.ConversionError as e:
      consumed |= set(e.consumed)
      problems += e.problems
  # A tied checkpoint may still carry a head copy; transformers re-ties it to the embedding too.
  if cfg.text.tie_word_embeddings and LM_HEAD in ckpt.where:
    consumed.add(LM_HEAD)
  unexpected = sorted(set(ckpt.where) - consumed)
  if unexpected:
    problems.append("unexpected: " + ", ".join(unexpected))
  if problems:
    raise hf_names.ConversionError([f"in {path}:"] + problems, sorted(consumed))
  return cfg, model


def iter_hf_tensors(cfg: config_lib.ModelConfig, model: Qwen25VL,
                    layout: tuple[str, str] = HUB_LAYOUT) -> Iterator[tuple[str, np.ndarray]]:
  """Yields `(hub name, array)` for every parameter of `model`, one tensor at a time."""
  for module, rules, num_layers, prefix in _components(cfg, model, layout):
    yield from hf_names.export(module, rules, num_layers=num_layers, prefix=prefix)


def save_hf(cfg: config_lib.ModelConfig, model: Qwen25VL, path: str | os.PathLike,
            dtype: np.dtype | None = None, max_shard_bytes: int = 2 << 30) -> None:
  """Writes a directory that `Qwen2_5_VLForConditionalGeneration.from_pretrained` loads.

  Tensors are fetched from devices one at a time and written in shards of at most
  `max_shard_bytes` (with `model.safetensors.index.json` when there is more than one), so host
  memory holds one shard, never the whole model. Files appear atomically (temp + rename).
  """
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  size, written = 0, []

  def flush():
    index = len(written)
    tmp = path / f".shard-{index}.tmp"
    save_file(shards[-1], str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, mode)  # safetensors creates 0600: a shared model directory must be readable
    written.append((tmp, list(shards[-1])))
    shards[-1] = {}

  mask = os.umask(0)
  os.umask(mask)
  mode = 0o666 & ~mask
  out_dtype = None
  for name, array in iter_hf_tensors(cfg, model):
    array = np.ascontiguousarray(array if dtype is None else array.astype(dtype))
    out_dtype = out_dtype or array.dtype
    if shards[-1] and size + array.nbytes > max_shard_bytes:
      flush()
      size = 0
    shards[-1][name] = array
    size += array.nbytes
  flush()

  if len(written) == 1:
    os.replace(written[0][0], path / "model.safetensors")
  else:
    weight_map = {}
    for i, (tmp, names) in enumerate(written):
      final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
      os.replace(tmp, path / final)
      weight_map.update(dict.fromkeys(names, final))
    total = sum((path / f).stat().st_size for f in set(weight_map.values()))
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
  hf_config = config_lib.to_hf_config(cfg)
  hf_config["dtype"] = str(out_dtype)
  (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
