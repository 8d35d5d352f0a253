"""The rollout layout copy: per-layer text weights in the compute dtype, one parameter at a time."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from robot_r1_jax.generate import sampling
from robot_r1_jax.generate.layout import LayoutCopy
from robot_r1_jax.model import config as config_lib, sharding
from robot_r1_jax.model.qwen2_5_vl import init_model

from testing import make_mesh, make_sampler


@pytest.fixture(scope="module")
def mesh():
  return make_mesh(fsdp=4)


@pytest.fixture(scope="module")
def model(mesh):
  cfg = config_lib.tiny()
  # Four text layers: the layer count is seen apart from the other stacked sizes.
  cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_layers=4))
  return init_model(cfg, seed=5, dtype=jnp.bfloat16, mesh=mesh)


def _bytes_per_device(x) -> int:
  return int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize


def test_the_copy_holds_each_text_layer_apart_in_the_compute_dtype_on_the_layout(model, mesh):
  layout = sharding.inference_mesh(mesh, 2)
  copy = LayoutCopy(model, layout)(nnx.state(model))
  source = nnx.state(model)
  stacked = source["text"]["layers"]["mlp"]["gate"][...]
  assert len(copy["text"]["layers"]) == stacked.shape[0] == 4
  for i, layer in copy["text"]["layers"].items():
    gate = layer["mlp"]["gate"][...]
    assert gate.dtype == jnp.bfloat16 and gate.shape == stacked.shape[1:]
    np.testing.assert_array_equal(np.asarray(gate), np.asarray(stacked[i].astype(jnp.bfloat16)))
    # [D, F] split over tensor on F only; the training layout's FSDP split is gone.
    assert gate.sharding.mesh == layout
    assert gate.sharding.shard_shape(gate.shape) == (gate.shape[0], gate.shape[1] // 2)
  # Everything else keeps its structure: the vision blocks stay stacked, only cast.
  blocks = jax.tree.leaves(source["vision"])
  assert [(x.shape, jnp.bfloat16) for x in blocks] == [
      (x.shape, x.dtype) for x in jax.tree.leaves(copy["vision"])]


def test_separate_layers_compute_what_the_stacked_ones_do():
  model = init_model(config_lib.tiny(), seed=2)  # f32: the two differ by summation order only
  copy = LayoutCopy(model, None)
  separate = nnx.merge(copy.graphdef, copy(nnx.state(model)))
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 200, (2, 7)), jnp.int32)
  forward = jax.jit(lambda m, ids: m(ids))
  np.testing.assert_allclose(forward(separate, ids), forward(model, ids), rtol=1e-5, atol=1e-6)


def test_off_a_mesh_only_what_changes_is_copied():
  """On one device an f32 model's embedding and vision tower are the layout's as they are (no
  second copy); its stacked text layers become separate buffers, and a bf16 layout casts all."""
  model = init_model(config_lib.tiny(), seed=2)
  state = nnx.state(model)
  same = LayoutCopy(model, None)(state)
  pointer = lambda x: x.unsafe_buffer_pointer()
  assert pointer(same["text"]["embedding"][...]) == pointer(state["text"]["embedding"][...])
  assert list(map(pointer, jax.tree.leaves(same["vision"]))) == list(
      map(pointer, jax.tree.leaves(state["vision"])))
  stacked = state["text"]["layers"]["mlp"]["gate"][...]
  assert same["text"]["layers"][1]["mlp"]["gate"][...].shape == stacked.shape[1:]
  cast = init_model(config_lib.tiny(), seed=2, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  embedding = LayoutCopy(cast, None)(nnx.state(cast))["text"]["embedding"][...]
  assert embedding.dtype == jnp.bfloat16


def test_each_program_of_the_copy_moves_one_parameter(model, mesh):
  """Temporaries of the order of one parameter, not the model: every program's arguments are one
  parameter and its temporaries are under the largest parameter's whole size (a move between
  meshes may gather it; the CPU backend gathers bf16 as f32, a TPU in bf16)."""
  state = nnx.state(model)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  copy = LayoutCopy(model, sharding.inference_mesh(mesh, 2))
  programs = copy.lower(abstract)
  leaves = jax.tree.leaves(state)
  assert len(programs) == len(leaves)
  largest = max(x.nbytes for x in leaves)
  total = sum(x.nbytes for x in leaves)
  for lowered, leaf in zip(programs, leaves):
    memory = lowered.compile().memory_analysis()
    assert memory.argument_size_in_bytes == _bytes_per_device(leaf)
    assert memory.temp_size_in_bytes <= largest < total / 4
  # The abstract copy is what the real one is.
  assert jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), copy(abstract)) == jax.tree.map(
      lambda x: (x.shape, x.dtype, x.sharding), copy(state))


def _decode_loop(model, mesh, new_tokens: int):
  """The compiled decode loop of 4 prompts × G = 2 on the layout, its params and prefill state."""
  sampler = make_sampler(model, mesh=mesh, sampling=sampling.SamplingParams(), num_samples=2,
                         prompt_buckets=(8,), new_token_buckets=(new_tokens,))
  params = sampler.layout_params()
  ids = np.random.default_rng(1).integers(3, 200, (4, 8)).astype(np.int32)
  state = sampler.prefill(ids, np.ones_like(ids), max_new_tokens=new_tokens, params=params)
  scalar = jax.sharding.NamedSharding(sampler.layout, jax.sharding.PartitionSpec())
  with sharding.on_mesh(sampler.layout):
    compiled = sampler.decode_loop.lower(
        params, state.cache, dataclasses.replace(state, cache=None),
        jax.device_put(jax.random.key(0), scalar),
        jax.device_put(jnp.int32(new_tokens), scalar)).compile()
  return compiled, params, state


def test_the_decode_loop_holds_no_second_copy_of_the_layers(mesh):
  """The loop reads the layout's per-layer weights in place: its temporaries are smaller than the
  text layers (slicing stacked layers before the loop held all of them again). A wide MLP makes
  the layers outweigh the loop's other temporaries; f32, as the CPU backend computes bf16 dots in
  f32 on f32 copies of the weights."""
  cfg = config_lib.tiny()
  cfg = cfg.replace(text=dataclasses.replace(cfg.text, intermediate_size=3989))
  compiled, params, _ = _decode_loop(init_model(cfg, seed=5, mesh=mesh), mesh, new_tokens=8)
  text_layers = sum(_bytes_per_device(x) for x in jax.tree.leaves(params["text"]["layers"]))
  assert compiled.memory_analysis().temp_size_in_bytes < text_layers


def test_the_decode_loop_holds_no_second_copy_of_the_cache(mesh):
  """The prefill hands the loop one cache buffer per layer (and one per layer of the prompts'
  shared prefix), each aliased to its donated input (unstacking a stacked cache inside the loop's
  program held all of it again: 2.18 GiB of the 7B decode's temporaries per chip on v5e:4x4,
  0.03 GiB without). The CPU backend copies the carry's
  cache buffers within each step (1.5× the cache here, with or without), so the bound is 2× the
  cache; the stacked form read 2.3×. A long new-token bucket makes the cache outweigh the loop's
  other temporaries."""
  model = init_model(config_lib.tiny(), seed=5, mesh=mesh)
  compiled, _, state = _decode_loop(model, mesh, new_tokens=1024)
  memory = compiled.memory_analysis()
  prefix = state.cache.prefix  # the prompts' keys/values, which the samples share
  cache = sum(_bytes_per_device(x) for x in (*state.cache.k, *state.cache.v, *prefix.k,
                                             *prefix.v))
  assert memory.alias_size_in_bytes >= cache
  assert memory.temp_size_in_bytes < 2 * cache
