"""Qwen2.5-VL inputs: image -> vision patches, chat-template prompt -> token ids, ids -> text.

The image path is NumPy + PIL only (data-loader workers never import torch) and equals Hugging
Face's `Qwen2VLImageProcessorPil` bit for bit: the same PIL bicubic resize of the uint8 image, the
same float64 rescale cast to float32, the same float32 normalisation, the same patch order. Prompt
ids equal what `Qwen2_5_VLProcessor` gives for the chat-template text: one `<|image_pad|>` per
merged image token.

Shapes: P vision patches (t·h·w of `grid_thw`), T prompt tokens, B completions.
"""

from __future__ import annotations

import math
import pathlib
from typing import TYPE_CHECKING, Sequence

import numpy as np
import PIL.Image

if TYPE_CHECKING:
  from transformers import PreTrainedTokenizerBase

MIN_PIXELS = 56 * 56  # 3136, the Qwen2.5-VL preprocessor_config.json value.
MAX_PIXELS = 28 * 28 * 16384  # 12845056, idem (the processor class default is smaller).
# OpenAI CLIP statistics, as transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_PAD_TOKEN = "<|image_pad|>"
TOKENIZER_ASSET_DIR = pathlib.Path(__file__).resolve().parent / "assets" / "tokenizer"


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
  """The (height, width) Qwen2-VL resizes an image to, as transformers' `smart_resize`.

  Both sides become multiples of `factor`, the area lands in [min_pixels, max_pixels] and the aspect
  ratio is kept as well as possible. Python's `round` (halves to even) is part of the contract.
  """
  if height <= 0 or width <= 0:
    raise ValueError(f"image height={height} and width={width} must be positive")
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"image aspect ratio must be at most 200, got height={height}, width={width}")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def preprocess_image(image: np.ndarray, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                     patch_size: int = 14, temporal_patch_size: int = 2,
                     merge_size: int = 2) -> tuple[np.ndarray, tuple[int, int, int]]:
  """One RGB image -> the vision tower's flattened patches and their grid.

  Args:
    image: uint8 [H, W, 3].
    min_pixels, max_pixels: area bounds for `smart_resize`.
    patch_size, temporal_patch_size, merge_size: the vision config's values.

  Returns:
    pixel_values: float32 [P, 3 · temporal_patch_size · patch_size²] ([P, 1176] for Qwen2.5-VL).
      Each row is one patch ordered [channel][temporal][row][col]; the single image is repeated
      over the temporal slices; every merge_size² consecutive rows form one merge unit (row-major
      within it), and units run row-major over the image.
    grid_thw: (1, H' / patch_size, W' / patch_size) for the resized H' x W'; P = t · h · w.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image must be a uint8 [H, W, 3] RGB array, got {image.dtype} "
                     f"{list(image.shape)}")
  height, width = image.shape[:2]
  new_h, new_w = smart_resize(height, width, factor=patch_size * merge_size,
                              min_pixels=min_pixels, max_pixels=max_pixels)
  # Hugging Face resizes through PIL even when the size is unchanged; PIL returns a copy then.
  resized = np.asarray(
      PIL.Image.fromarray(image).resize((new_w, new_h), PIL.Image.Resampling.BICUBIC))
  # HF's dtype path: rescale in float64, cast once, normalise in float32. (A float32 multiply by
  # 1/255 would already be one ulp off for half of the byte values.)
  pixels = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
  pixels = (pixels - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)

  grid_h, grid_w = new_h // patch_size, new_w // patch_size
  m, p = merge_size, patch_size
  patches = pixels.reshape(grid_h // m, m, p, grid_w // m, m, p, 3)
  # -> [h/m, w/m, m, m, C, p, p]: merge units row-major, then patches within a unit, then pixels.
  patches = patches.transpose(0, 3, 1, 4, 6, 2, 5)
  patches = np.broadcast_to(patches[:, :, :, :, :, None],
                            (*patches.shape[:5], temporal_patch_size, p, p))
  pixel_values = np.ascontiguousarray(patches).reshape(grid_h * grid_w,
                                                       3 * temporal_patch_size * p * p)
  return pixel_values, (1, grid_h, grid_w)


def image_token_count(grid_thw: Sequence[int], merge_size: int = 2) -> int:
  """Number of `<|image_pad|>` tokens (merged vision tokens) for an image of grid (t, h, w)."""
  t, h, w = (int(x) for x in grid_thw)
  if h % merge_size or w % merge_size:
    raise ValueError(f"grid_thw={list(grid_thw)}: h and w must be multiples of "
                     f"merge_size={merge_size}")
  return t * h * w // merge_size**2


# ----------------------------------------------------------------------------------------------
# Text.


def load_tokenizer(path: str | pathlib.Path | None = None) -> PreTrainedTokenizerBase:
  """`AutoTokenizer.from_pretrained` on a local directory; default: the packaged tiny tokenizer.

  A real Qwen2.5-VL checkpoint directory works too. Never downloads.
  """
  from transformers import AutoTokenizer  # Slow to import; only text paths need it.

  directory = TOKENIZER_ASSET_DIR if path is None else pathlib.Path(path)
  if not directory.is_dir():
    raise FileNotFoundError(f"tokenizer path {str(directory)!r} is not a directory")
  return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def build_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt_text: str,
                     grid_thw: Sequence[int] | None, *, merge_size: int = 2,
                     system_prompt: str | None = None) -> np.ndarray:
  """Token ids of one user turn (the image, if any, then `prompt_text`) ready for generation.

  Renders the tokenizer's chat template with add_generation_prompt=True (the Qwen2.5-VL template
  adds its default system turn when `system_prompt` is None), tokenizes it, and expands the single
  `<|image_pad|>` to image_token_count(grid_thw) copies, as `Qwen2_5_VLProcessor` does.

  Returns:
    int32 [T].
  """
  if tokenizer.chat_template is None:
    raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template")
  content: list[dict[str, str]] = [] if grid_thw is None else [{"type": "image"}]
  content.append({"type": "text", "text": prompt_text})
  messages = [{"role": "user", "content": content}]
  if system_prompt is not None:
    messages.insert(0, {"role": "system", "content": system_prompt})
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int32)

  pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD_TOKEN)
  positions = np.flatnonzero(ids == pad_id)
  expected = 0 if grid_thw is None else 1
  if positions.size != expected:
    raise ValueError(
        f"the rendered prompt has {positions.size} {IMAGE_PAD_TOKEN} token(s), expected {expected} "
        f"(grid_thw={grid_thw}); prompt_text and system_prompt must not contain {IMAGE_PAD_TOKEN}")
  if grid_thw is None:
    return ids
  # Expanding ids rather than text gives the same ids: added tokens are never merged by BPE.
  at = positions[0]
  expansion = np.full(image_token_count(grid_thw, merge_size), pad_id, np.int32)
  return np.concatenate([ids[:at], expansion, ids[at + 1:]])


def decode_completions(tokenizer: PreTrainedTokenizerBase, token_ids: np.ndarray) -> list[str]:
  """Completion text per row, cut before the first end token (eos or pad), special tokens removed.

  Args:
    token_ids: int [B, T] sampled tokens (the prompt excluded).

  Returns:
    B strings. Tokens a sampler produced after its end token never reach the reward.
  """
  token_ids = np.asarray(token_ids)
  if token_ids.ndim != 2:
    raise ValueError(f"token_ids must be [B, T], got shape {list(token_ids.shape)}")
  stop = [i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None]
  texts = []
  for row in token_ids:
    ends = np.flatnonzero(np.isin(row, stop))
    kept = row[:ends[0]] if ends.size else row
    texts.append(tokenizer.decode(kept.tolist(), skip_special_tokens=True))
  return texts
