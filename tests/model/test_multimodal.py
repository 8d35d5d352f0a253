"""Full multimodal logits against transformers: image preprocessing → vision tower → decoder."""

from __future__ import annotations

import numpy as np
import pytest

from robot_r1_jax.model import hf_io, processor

from hf_reference import build_hf, hf_logits, tiny_config
from testing import image_prompts

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  cfg = tiny_config(tie=False)
  hf = build_hf(cfg, seed=5)
  path = tmp_path_factory.mktemp("hf")
  hf.save_pretrained(path)
  _, model = hf_io.load_hf(path)
  return cfg, hf, model, path


def _image(rng, h, w):
  return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _batch(tokenizer, prompts_and_images):
  """Left-padded ids/mask of prompts with one image each, their patches and grids."""
  prompts = image_prompts(tokenizer, prompts_and_images)
  return prompts.ids, prompts.mask, prompts.pixel_values, np.array(prompts.grids)


def _assert_close(got, want, mask):
  real = mask.astype(bool)
  np.testing.assert_array_less(np.abs(np.asarray(got)[real] - want[real]).max(),
                               1e-4 * np.abs(want[real]).max())


def test_one_image_with_window_padding(loaded, tokenizer):
  _, hf, model, _ = loaded
  # 140x196 pixels → a 10x14 patch grid → 5x7 merged tokens: not a multiple of the 4x4 window.
  ids, mask, pv, grid = _batch(tokenizer, [("Where is the cup?",
                                            _image(np.random.default_rng(0), 140, 196))])
  assert tuple(grid[0]) == (1, 10, 14)
  _assert_close(model(ids, mask, pv, grid), hf_logits(hf, ids, mask, pv, grid), mask)


def test_batch_of_two_image_sizes_left_padded(loaded, tokenizer):
  _, hf, model, _ = loaded
  rng = np.random.default_rng(1)
  ids, mask, pv, grid = _batch(tokenizer, [
      ("Move the gripper to the red block, then describe the path.", _image(rng, 112, 112)),
      ("Pick up the cup.", _image(rng, 84, 168))])
  assert mask[1].sum() < mask.shape[1] or mask[0].sum() < mask.shape[1]  # one row is padded
  _assert_close(model(ids, mask, pv, grid), hf_logits(hf, ids, mask, pv, grid), mask)


def test_prompt_with_two_images(loaded, tokenizer):
  cfg, hf, model, _ = loaded
  rng = np.random.default_rng(2)
  pv1, g1 = processor.preprocess_image(_image(rng, 56, 84))
  pv2, g2 = processor.preprocess_image(_image(rng, 112, 56))
  def block(grid):
    return ([cfg.vision_start_token_id] + [cfg.image_token_id] * processor.image_token_count(grid)
            + [cfg.vision_end_token_id])
  text = lambda s: list(tokenizer(s)["input_ids"])
  row = text("before") + block(g1) + text(" and then ") + block(g2) + text(" after")
  ids, mask = np.array([row]), np.ones((1, len(row)), np.int64)
  pv, grid = np.concatenate([pv1, pv2]), np.array([g1, g2])
  _assert_close(model(ids, mask, pv, grid), hf_logits(hf, ids, mask, pv, grid), mask)


def test_save_hf_round_trip_with_image(loaded, tokenizer, tmp_path):
  cfg, _, model, _ = loaded
  hf_io.save_hf(cfg, model, tmp_path)
  again = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      tmp_path, attn_implementation="eager").eval()
  ids, mask, pv, grid = _batch(tokenizer, [("Push the button.",
                                            _image(np.random.default_rng(3), 84, 84))])
  np.testing.assert_allclose(hf_logits(again, ids, mask, pv, grid),
                             np.asarray(model(ids, mask, pv, grid)), atol=1e-5)


def test_token_feature_count_mismatch_names_both(loaded, tokenizer):
  cfg, _, model, _ = loaded
  ids, _, pv, grid = _batch(tokenizer, [("Hi", _image(np.random.default_rng(4), 56, 56))])
  pads = np.flatnonzero(ids[0] == cfg.image_token_id)
  assert len(pads) == 4  # 56x56 → 4x4 patches → 2x2 merged tokens
  short = np.delete(ids, pads[:3], axis=1)
  with pytest.raises(ValueError, match=r"1 <\|image_pad\|> tokens.*, 4 features"):
    model(short, None, pv, grid)
