"""bench/machine.py: the matmul floor multiplies every text layer weight once per row, the LM head
once per head row, and nothing else."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import jax.numpy as jnp
import pytest
from flax import nnx

from robot_r1_jax.model import config as config_lib
from robot_r1_jax.model.qwen2_5_vl import init_model

_SPEC = importlib.util.spec_from_file_location(
    "machine", pathlib.Path(__file__).resolve().parents[2] / "bench" / "machine.py")
machine = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(machine)


@pytest.mark.parametrize("tied", [True, False])
def test_text_matmuls_cover_every_layer_weight_and_the_head(tied):
  cfg = config_lib.tiny()
  cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, tie_word_embeddings=tied))
  model = init_model(cfg)
  text = cfg.text
  matmuls = machine.TextMatmuls(model)
  # q, k, v, o, gate, up, down in every layer, each its own [in, out] buffer.
  assert len(matmuls._weights) == 7 * text.num_layers
  layer_params = sum(leaf[...].size for path, leaf in
                     nnx.to_flat_state(nnx.state(model.text.layers, nnx.Param))
                     if not str(path[-1]).endswith(("bias", "scale")))
  assert sum(w.size for w in matmuls._weights) == layer_params
  assert matmuls._head.shape == (text.hidden_size, text.vocab_size)
  weight, axes = model.head_weight()
  assert bool(jnp.all(matmuls._head == (weight.T if axes == "VD" else weight)))

  rows, head_rows = 13, 5
  inputs = {width: jnp.ones((rows, width)) for width in matmuls._widths}
  cost = matmuls._program.lower(inputs, matmuls._weights, jnp.ones((head_rows, text.hidden_size)),
                                matmuls._head).compile().cost_analysis()
  assert cost["flops"] == 2 * rows * layer_params + 2 * head_rows * text.hidden_size * text.vocab_size
  assert matmuls.flops(rows, head_rows) == cost["flops"]
  assert matmuls.seconds(rows, head_rows, repeats=2) > 0
