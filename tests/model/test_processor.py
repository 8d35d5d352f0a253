"""Image patches and prompt ids against Hugging Face's PIL image processor and the hub template."""

from __future__ import annotations

import types

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from robot_r1_jax.model import config as config_lib
from robot_r1_jax.model import processor

# An independent copy of the chat_template.json of Qwen/Qwen2.5-VL-{3B,7B}-Instruct, so that an edit
# to the generator's copy (tokenizer_asset.py) fails here.
HUB_CHAT_TEMPLATE = (
    '{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}'
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}'
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    '{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}'
    'Picture {{ image_count.value }}: {% endif %}'
    '<|vision_start|><|image_pad|><|vision_end|>'
    "{% elif content['type'] == 'video' or 'video' in content %}"
    '{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}'
    'Video {{ video_count.value }}: {% endif %}'
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    '{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}')

PROMPT = ("You are a Franka Panda robot assistant for task planning and execution.\n"
          "Task: pick up the red cup.\nCurrent robot state: Position: [0.281, -0.104, 0.913]\n"
          "Question: Which movement should the robot make to reach the next keyframe?\n"
          "[[A]] move forward\n[[B]] move slightly left and up\n[[C]] move down\n[[D]] stay still")

# (H, W): the required sizes, odd sizes, extreme aspect ratios, and sizes that round half to even.
# No side is 1, 3 or 4: Hugging Face would take such an [H, W, 3] array for channels-first.
FIXED_SIZES = [(28, 28), (224, 224), (128, 128), (480, 640), (640, 480), (37, 91), (29, 501),
               (601, 33), (55, 57), (2, 301), (300, 5), (42, 70), (99, 99), (333, 127)]


@pytest.fixture(scope="module")
def hf_image_processor():
  pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

  def make(min_pixels=processor.MIN_PIXELS, max_pixels=processor.MAX_PIXELS):
    # Bounds go to the constructor: passing them to the call is deprecated (a FutureWarning).
    return pil.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)

  return make


def _random_sizes(n: int, seed: int) -> list[tuple[int, int]]:
  rng = np.random.default_rng(seed)
  return [(int(rng.integers(28, 481)), int(rng.integers(28, 641))) for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# smart_resize and image patches.


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(height=st.integers(1, 4000), width=st.integers(1, 4000),
                  factor=st.sampled_from([14, 28, 32]),
                  min_pixels=st.sampled_from([1, 3136, 200_704]),
                  max_pixels=st.sampled_from([50_176, 1_003_520, 12_845_056]))
def test_smart_resize_matches_hf(height, width, factor, min_pixels, max_pixels):
  pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
  hypothesis.assume(max(height, width) / min(height, width) <= 200)
  expected = pil.smart_resize(height, width, factor=factor, min_pixels=min_pixels,
                              max_pixels=max_pixels)
  assert processor.smart_resize(height, width, factor, min_pixels, max_pixels) == expected


def test_smart_resize_rounds_half_to_even():
  # 42 / 28 = 1.5 -> 2 and 70 / 28 = 2.5 -> 2 (half-up rounding would give 3).
  assert processor.smart_resize(42, 70, min_pixels=1) == (56, 56)
  assert processor.smart_resize(14, 14) == (56, 56)  # lifted to min_pixels
  assert processor.smart_resize(4480, 4480) == (3584, 3584)  # capped by max_pixels


def test_smart_resize_rejects_bad_sizes():
  with pytest.raises(ValueError, match="aspect ratio"):
    processor.smart_resize(10, 2001)
  with pytest.raises(ValueError, match="height=0"):
    processor.smart_resize(0, 10)


def test_preprocess_matches_hf_pil_processor(hf_image_processor):
  reference = hf_image_processor()
  rng = np.random.default_rng(0)
  sizes = FIXED_SIZES + _random_sizes(12, seed=1)
  assert len(sizes) >= 20
  for height, width in sizes:
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixel_values, grid_thw = processor.preprocess_image(image)
    expected = reference(images=image, return_tensors="np")
    assert grid_thw == tuple(expected["image_grid_thw"][0].tolist()), (height, width)
    assert pixel_values.dtype == np.float32 and pixel_values.shape == (np.prod(grid_thw), 1176)
    np.testing.assert_allclose(pixel_values, expected["pixel_values"], rtol=0, atol=1e-6,
                               err_msg=f"image {height}x{width}")


def test_preprocess_is_bit_identical_to_hf(hf_image_processor):
  # Stronger than the 1e-6 acceptance bound: the implementation follows HF's dtype path exactly
  # (float64 rescale, float32 normalise), so any drift in that path shows up here first.
  image = np.random.default_rng(4).integers(0, 256, (221, 307, 3), dtype=np.uint8)
  expected = hf_image_processor()(images=image, return_tensors="np")["pixel_values"]
  np.testing.assert_array_equal(processor.preprocess_image(image)[0], expected)


@pytest.mark.parametrize("min_pixels,max_pixels", [(3136, 28 * 28 * 16), (401_408, 12_845_056)])
def test_preprocess_pixel_bounds_match_hf(hf_image_processor, min_pixels, max_pixels):
  image = np.random.default_rng(2).integers(0, 256, (480, 640, 3), dtype=np.uint8)
  pixel_values, grid_thw = processor.preprocess_image(image, min_pixels=min_pixels,
                                                      max_pixels=max_pixels)
  expected = hf_image_processor(min_pixels, max_pixels)(images=image, return_tensors="np")
  assert grid_thw == tuple(expected["image_grid_thw"][0].tolist())
  assert grid_thw != (1, 34, 46)  # the bounds changed the size
  np.testing.assert_allclose(pixel_values, expected["pixel_values"], rtol=0, atol=1e-6)


def test_patch_layout():
  # 56x56 is already a valid size, so the (identity) resize leaves pixels untouched and each row can
  # be checked against the normalised image directly: 4x4 patches, 2x2 merge units row-major.
  image = np.random.default_rng(3).integers(0, 256, (56, 56, 3), dtype=np.uint8)
  pixel_values, grid_thw = processor.preprocess_image(image)
  assert grid_thw == (1, 4, 4)
  norm = ((image.astype(np.float64) / 255).astype(np.float32) - np.float32(processor.IMAGE_MEAN)
          ) / np.float32(processor.IMAGE_STD)
  row_of_patch = {(0, 0): 0, (0, 1): 1, (1, 0): 2, (1, 1): 3, (0, 2): 4, (1, 3): 7, (2, 0): 8,
                  (3, 3): 15}
  for (pr, pc), row in row_of_patch.items():
    patch = norm[14 * pr:14 * pr + 14, 14 * pc:14 * pc + 14].transpose(2, 0, 1)  # [C, 14, 14]
    vector = pixel_values[row].reshape(3, 2, 14, 14)  # [channel][temporal][row][col]
    for t in range(2):
      np.testing.assert_allclose(vector[:, t], patch, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [np.zeros((32, 32, 3), np.float32), np.zeros((32, 32), np.uint8),
                                 np.zeros((32, 32, 4), np.uint8)])
def test_preprocess_rejects_non_rgb_uint8(bad):
  with pytest.raises(ValueError, match=r"image must be a uint8 \[H, W, 3\]"):
    processor.preprocess_image(bad)


# ------------------------------------------------------------------------------------------------
# Prompt ids.


def _hf_prompt_ids(tokenizer, messages, grid_thw) -> list[int]:
  """What Qwen2_5_VLProcessor gives: hub template, its own image-token expansion, tokenize."""
  from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

  text = tokenizer.apply_chat_template(messages, chat_template=HUB_CHAT_TEMPLATE, tokenize=False,
                                       add_generation_prompt=True)
  if grid_thw is not None:
    # The processor class cannot be built without torchvision (it insists on a video processor),
    # so its expansion method runs on a stand-in holding the two attributes it reads.
    stand_in = types.SimpleNamespace(image_token=processor.IMAGE_PAD_TOKEN,
                                     image_processor=types.SimpleNamespace(merge_size=2))
    expansion = Qwen2_5_VLProcessor.replace_image_token(
        stand_in, {"image_grid_thw": np.array([grid_thw])}, 0)
    text = text.replace(processor.IMAGE_PAD_TOKEN, expansion)
  return tokenizer(text)["input_ids"]


@pytest.mark.parametrize("image_size", [(224, 224), (128, 128), (480, 640)])
def test_prompt_ids_match_hf_with_image(tokenizer, image_size):
  image = np.zeros((*image_size, 3), np.uint8)
  pixel_values, grid_thw = processor.preprocess_image(image)
  ids = processor.build_prompt_ids(tokenizer, PROMPT, grid_thw)
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
  assert ids.dtype == np.int32
  assert ids.tolist() == _hf_prompt_ids(tokenizer, messages, grid_thw)
  image_id = config_lib.tiny().image_token_id
  merged_tokens = pixel_values.shape[0] // 4
  assert int((ids == image_id).sum()) == merged_tokens == processor.image_token_count(grid_thw)
  # One contiguous block between vision_start and vision_end.
  start = int(np.flatnonzero(ids == image_id)[0])
  assert ids[start - 1] == config_lib.tiny().vision_start_token_id
  assert ids[start + merged_tokens] == config_lib.tiny().vision_end_token_id


def test_prompt_text_layout(tokenizer):
  ids = processor.build_prompt_ids(tokenizer, "Which way?", (1, 4, 6))
  expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
              "<|vision_start|>" + "<|image_pad|>" * 6 + "<|vision_end|>Which way?<|im_end|>\n"
              "<|im_start|>assistant\n")
  assert tokenizer.decode(ids.tolist()) == expected


def test_prompt_ids_with_system_prompt_and_without_image(tokenizer):
  ids = processor.build_prompt_ids(tokenizer, PROMPT, None, system_prompt="You control a robot.")
  messages = [{"role": "system", "content": "You control a robot."},
              {"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
  assert ids.tolist() == _hf_prompt_ids(tokenizer, messages, None)
  assert config_lib.tiny().image_token_id not in ids
  assert tokenizer.decode(ids.tolist()).startswith("<|im_start|>system\nYou control a robot.")


def test_prompt_ids_reject_image_pad_in_text(tokenizer):
  with pytest.raises(ValueError, match=r"has 2 <\|image_pad\|> token\(s\), expected 1"):
    processor.build_prompt_ids(tokenizer, "look: <|image_pad|>", (1, 2, 2))
  with pytest.raises(ValueError, match="multiples of merge_size=2"):
    processor.build_prompt_ids(tokenizer, "x", (1, 3, 2))


def test_load_tokenizer_names_a_missing_directory(tmp_path):
  pytest.importorskip("transformers")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    processor.load_tokenizer(tmp_path / "nowhere")


def test_decode_completions_stops_at_the_end_token(tokenizer):
  answer = "<think> The cup is ahead. </think> <answer> [[A]] </answer>"
  body = tokenizer(answer)["input_ids"]
  eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
  garbage = tokenizer(" [[B]]")["input_ids"]
  rows = np.full((3, len(body) + 1 + len(garbage)), pad, np.int32)
  rows[0, :len(body)] = body
  rows[0, len(body)] = eos
  rows[0, len(body) + 1:] = garbage  # sampled after eos: must not count
  rows[1, :len(body)] = body  # ended by padding
  rows[2, :] = (body + garbage + garbage)[:rows.shape[1]]  # never ended
  texts = processor.decode_completions(tokenizer, rows)
  assert texts[:2] == [answer, answer]
  assert texts[2].startswith(answer + " [[B]]")
  with pytest.raises(ValueError, match=r"\[B, T\]"):
    processor.decode_completions(tokenizer, rows[0])
