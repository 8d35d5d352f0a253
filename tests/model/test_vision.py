"""Vision tower against Hugging Face's `Qwen2_5_VisionTransformerPretrainedModel` on the tiny preset."""

from __future__ import annotations

import copy
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from robot_r1_jax.model import config as config_lib
from robot_r1_jax.model import hf_names, sharding, vision

CFG = config_lib.tiny().vision

# (a) a 5x7 merged grid, not a multiple of the 4x4 window; (b) two images of different sizes packed;
# (c) a 224x224 image (16x16 patches: 8x8 merged, so HF adds wholly empty padding windows);
# (d) a two-frame video next to an image; (e, f) images of one grid, which run on an image axis
# (ragged windows, and equal windows and frames that group by reshape alone).
GRIDS = {
    "one_5x7": ((1, 10, 14),),
    "two_images": ((1, 10, 14), (1, 16, 6)),
    "224px": ((1, 16, 16),),
    "video_and_image": ((2, 8, 12), (1, 4, 4)),
    "three_5x7": ((1, 10, 14),) * 3,
    "two_224px": ((1, 16, 16),) * 2,
}


def _hf_modules():
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from transformers.models.qwen2_5_vl import configuration_qwen2_5_vl as hf_config
  from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf_model
  return torch, hf_config, hf_model


def _hf_vision_config(model_cfg: config_lib.ModelConfig):
  _, hf_config, _ = _hf_modules()
  return hf_config.Qwen2_5_VLVisionConfig(**config_lib.to_hf_config(model_cfg)["vision_config"])


@pytest.fixture(scope="module")
def hf_visual():
  """A tiny HF vision tower whose every parameter (norms and biases too) is random."""
  torch, _, hf_model = _hf_modules()
  model = hf_model.Qwen2_5_VisionTransformerPretrainedModel._from_config(
      _hf_vision_config(config_lib.tiny()), attn_implementation="eager").eval()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      # Norm scales around 1 and everything else small but non-zero, so a dropped bias or a
      # misplaced norm shows up.
      p.copy_(1.0 + 0.1 * noise if "norm" in name or "ln_q" in name else 0.08 * noise)
  return model


def _state(hf_model) -> dict[str, np.ndarray]:
  return {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}


def _abstract(cfg: config_lib.VisionConfig = CFG, dtype=jnp.float32,
              param_dtype=jnp.float32, remat: bool = False) -> vision.VisionTower:
  # Shapes only: compiling the random initialisers costs ~1 s per parameter shape on this CPU, and
  # every test overwrites all parameters anyway.
  return nnx.eval_shape(lambda: vision.VisionTower(cfg, dtype=dtype, param_dtype=param_dtype,
                                                   remat=remat, rngs=nnx.Rngs(0)))


def _tower(state: dict[str, np.ndarray], dtype=jnp.float32,
           param_dtype=jnp.float32) -> vision.VisionTower:
  tower = _abstract(CFG, dtype, param_dtype)
  hf_names.load_into(tower, vision.hf_rules(CFG), state.get, num_layers=CFG.depth)
  return tower


def _random_tower(seed: int = 0) -> vision.VisionTower:
  tower = _abstract()
  rng = np.random.default_rng(seed)
  nnx.update(tower, jax.tree.map(lambda s: jnp.asarray(0.05 * rng.normal(size=s.shape), s.dtype),
                                 nnx.state(tower, nnx.Param)))
  return tower


@nnx.jit(static_argnums=2)
def _run(tower: vision.VisionTower, pixels: jax.Array, grid_thw: vision.Grid) -> jax.Array:
  return tower(pixels, grid_thw)


def _pixels(grid_thw: vision.Grid, seed: int = 0) -> np.ndarray:
  patches = sum(t * h * w for t, h, w in grid_thw)
  return np.random.default_rng(seed).normal(size=(patches, CFG.patch_dim)).astype(np.float32)


def _hf_forward(model, pixels: np.ndarray, grid_thw: vision.Grid, dtype=None) -> np.ndarray:
  torch, _, _ = _hf_modules()
  x = torch.from_numpy(pixels)
  with torch.no_grad():
    out = model(x.to(dtype) if dtype is not None else x, torch.tensor(grid_thw)).pooler_output
  return out.float().numpy()


@pytest.mark.parametrize("name", list(GRIDS))
def test_matches_hf_f32(hf_visual, name):
  grid = GRIDS[name]
  pixels = _pixels(grid)
  ours = np.asarray(_run(_tower(_state(hf_visual)), jnp.asarray(pixels), grid))
  ref = _hf_forward(hf_visual, pixels, grid)
  assert ours.shape == ref.shape == (pixels.shape[0] // 4, CFG.out_hidden_size)
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_images_are_independent(hf_visual):
  """Packing two images gives each the tokens it gets alone: attention never crosses images."""
  grid = GRIDS["two_images"]
  pixels = _pixels(grid)
  tower = _tower(_state(hf_visual))
  packed = np.asarray(_run(tower, jnp.asarray(pixels), grid))
  first = grid[0][0] * grid[0][1] * grid[0][2]
  alone = [np.asarray(_run(tower, jnp.asarray(pixels[:first]), grid[:1])),
           np.asarray(_run(tower, jnp.asarray(pixels[first:]), grid[1:]))]
  np.testing.assert_allclose(packed, np.concatenate(alone), atol=1e-5, rtol=0)


def test_bf16_within_bound_of_hf_bf16(hf_visual):
  """bf16 compute and storage: our error against the f32 reference is no worse than 1.5x the error
  of Hugging Face's own bf16 model, and both bf16 models agree to within that same error."""
  torch, _, _ = _hf_modules()
  grid = GRIDS["224px"]
  pixels = _pixels(grid)
  ref = _hf_forward(hf_visual, pixels, grid)
  state = _state(hf_visual)
  # A copy: casting the shared fixture down and back would leave it with bf16-rounded weights.
  hf_bf16 = _hf_forward(copy.deepcopy(hf_visual).to(torch.bfloat16), pixels, grid,
                        dtype=torch.bfloat16)
  ours = _run(_tower(state, jnp.bfloat16, jnp.bfloat16), jnp.asarray(pixels), grid)
  assert ours.dtype == jnp.bfloat16
  ours = np.asarray(ours.astype(jnp.float32))
  hf_err = np.abs(hf_bf16 - ref).max()
  assert np.abs(ours - ref).max() <= 1.5 * hf_err
  assert np.abs(ours - hf_bf16).max() <= 1.5 * hf_err


def test_hf_rules_round_trip(hf_visual):
  """load_into consumes every HF tensor; export reproduces them bit for bit, and loading the export
  into a fresh tower reproduces its parameters."""
  state = _state(hf_visual)
  tower = _abstract()
  consumed = hf_names.load_into(tower, vision.hf_rules(CFG), state.get, num_layers=CFG.depth)
  assert sorted(consumed) == sorted(state)
  exported = dict(hf_names.export(tower, vision.hf_rules(CFG), num_layers=CFG.depth,
                                  prefix="visual."))
  assert sorted(exported) == sorted("visual." + k for k in state)
  for name, value in state.items():
    got = exported["visual." + name]
    assert got.shape == value.shape and got.dtype == value.dtype, name
    np.testing.assert_array_equal(got, value, err_msg=name)
  again = _abstract()
  hf_names.load_into(again, vision.hf_rules(CFG), exported.get, num_layers=CFG.depth,
                     prefix="visual.")
  jax.tree.map(np.testing.assert_array_equal, nnx.state(tower, nnx.Param),
               nnx.state(again, nnx.Param))


def test_load_names_missing_keys(hf_visual):
  state = _state(hf_visual)
  del state["blocks.2.attn.qkv.bias"]
  with pytest.raises(hf_names.ConversionError, match=r"blocks\.2\.attn\.qkv\.bias"):
    _tower(state)


def test_same_grid_does_not_retrace():
  traces = []

  @nnx.jit(static_argnums=2)
  def run(tower, pixels, grid_thw):
    traces.append(grid_thw)
    return tower(pixels, grid_thw)

  tower = _random_tower()
  grid = GRIDS["one_5x7"]
  run(tower, jnp.asarray(_pixels(grid, 1)), grid)
  run(tower, jnp.asarray(_pixels(grid, 2)), grid)
  assert len(traces) == 1
  run(tower, jnp.asarray(_pixels(GRIDS["224px"])), GRIDS["224px"])
  assert len(traces) == 2


def test_program_size_does_not_grow_with_depth():
  """Blocks run under one scan: the traced program is the same size at depth 2 and depth 6."""
  grid = GRIDS["one_5x7"]
  pixels = jnp.asarray(_pixels(grid))
  sizes = []
  for depth in (2, 6):
    cfg = dataclasses.replace(CFG, depth=depth, fullatt_block_indexes=(1,))
    graphdef, state = nnx.split(_abstract(cfg))
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(pixels, grid))(state)
    sizes.append(len(jaxpr.eqns))
  assert sizes[0] == sizes[1]


def test_sharded_params_give_the_same_output(mesh8):
  """Every logical axis name resolves on a (data, fsdp, tensor) = (2, 2, 2) mesh and the sharded
  tower computes what the unsharded one does (up to summation order)."""
  graphdef, state = nnx.split(_random_tower())
  grid = GRIDS["two_images"]
  pixels = jnp.asarray(_pixels(grid))
  run = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, grid))
  sharded = jax.device_put(state, sharding.param_shardings(state, mesh8))
  expected = jax.sharding.PartitionSpec(None, "fsdp", None, "tensor", None)
  assert sharded["blocks"]["attn"]["qkv"].sharding.spec == expected
  np.testing.assert_allclose(run(sharded, pixels), run(state, pixels), atol=1e-6, rtol=0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 2), st.integers(1, 11), st.integers(1, 11)),
                min_size=1, max_size=3))
def test_layout_matches_hf_vision_utils(images):
  """Window order, rotary positions and both segmentations equal transformers' helpers."""
  torch, _, _ = _hf_modules()
  from transformers import vision_utils
  grid = tuple((t, 2 * h, 2 * w) for t, h, w in images)
  layout = vision.grid_layout(CFG, grid)
  grid_t = torch.tensor(grid)
  window_index, cu_windows = vision_utils.get_vision_window_index(
      grid_t, spatial_merge_size=2, window_size=CFG.window_size, patch_size=CFG.patch_size)
  np.testing.assert_array_equal(layout.patch_order[::4] // 4, window_index.numpy())
  np.testing.assert_array_equal(layout.merged_restore, np.argsort(window_index.numpy()))
  positions = vision_utils.get_vision_position_ids(grid_t, 2).numpy()
  np.testing.assert_array_equal(layout.positions, positions[layout.patch_order])
  cu_frames = vision_utils.get_vision_cu_seqlens(grid_t).numpy()
  for segments, cu in ((layout.window_segments, cu_windows.numpy()),
                       (layout.frame_segments, cu_frames)):
    starts = np.flatnonzero(np.diff(segments, prepend=-1))
    np.testing.assert_array_equal(np.append(starts, len(segments)), cu)
    assert np.all(np.diff(segments) >= 0)  # contiguous, so every id is one run


def test_groups_gather_and_scatter_back():
  """Ragged runs are padded into a [W, L] table and come back in order; equal runs reshape."""
  groups = vision.Groups.of(np.array([0, 0, 0, 1, 2, 2]))
  np.testing.assert_array_equal(groups.index, [[0, 1, 2], [3, 0, 0], [4, 5, 0]])
  np.testing.assert_array_equal(groups.valid, [[1, 1, 1], [1, 0, 0], [1, 1, 0]])
  x = jnp.arange(12.0).reshape(2, 6)
  assert groups.gather(x).shape == (2, 3, 3) and not groups.regular
  np.testing.assert_array_equal(groups.scatter(groups.gather(x)), x)
  regular = vision.Groups.of(np.array([4, 4, 7, 7]))
  assert regular.regular
  np.testing.assert_array_equal(regular.gather(x[:, :4]), x[:, :4].reshape(2, 2, 2))


def test_memory_grows_linearly_with_the_images():
  """No score matrix spans images: twice the images of one grid, at most ~twice the temporaries
  (the packed attention this replaced grew ×4)."""
  graphdef, state = nnx.split(_abstract())

  def temp_bytes(images: int) -> int:
    grid = ((1, 16, 16),) * images
    run = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, grid))
    pixels = jax.ShapeDtypeStruct((images * 256, CFG.patch_dim), jnp.float32)
    return run.lower(state, pixels).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes(128) <= 2.3 * temp_bytes(64)


def test_remat_keeps_the_gradients_and_frees_the_activations():
  """Recomputing each block in the backward pass: equal gradients (f32), and fewer bytes held
  between the passes than storing every block's activations."""
  grid = ((1, 16, 16),) * 3
  pixels = jnp.asarray(_pixels(grid))
  params = nnx.state(_random_tower(), nnx.Param)

  def grad_fn(remat: bool):
    graphdef = nnx.graphdef(_abstract(remat=remat))
    return jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x, grid)))))

  plain, recomputed = grad_fn(False), grad_fn(True)
  for got, want in zip(jax.tree.leaves(recomputed(params, pixels)),
                       jax.tree.leaves(plain(params, pixels))):
    assert np.abs(got - want).max() <= 1e-6 * max(float(np.abs(want).max()), 1.0)
  temps = [f.lower(params, pixels).compile().memory_analysis().temp_size_in_bytes
           for f in (plain, recomputed)]
  assert temps[1] < 0.75 * temps[0], temps


def test_bad_inputs_are_named():
  tower = _random_tower()
  with pytest.raises(ValueError, match=r"\(140, 1176\)"):
    tower(jnp.zeros((100, CFG.patch_dim)), ((1, 10, 14),))
  with pytest.raises(ValueError, match=r"grid_thw\[1\].*spatial_merge_size=2"):
    tower(jnp.zeros((140, CFG.patch_dim)), ((1, 10, 10), (1, 5, 8)))


@pytest.mark.parametrize("preset", ["qwen2_5_vl_3b", "qwen2_5_vl_7b"])
def test_param_count_matches_hf(preset):
  torch, _, hf_model = _hf_modules()
  model_cfg = config_lib.PRESETS[preset]()
  cfg = model_cfg.vision
  with torch.device("meta"):
    hf = hf_model.Qwen2_5_VisionTransformerPretrainedModel._from_config(
        _hf_vision_config(model_cfg))
  hf_count = sum(p.numel() for p in hf.parameters())
  ours = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(_abstract(cfg), nnx.Param)))
  assert ours == hf_count
