"""The packaged tiny tokenizer: reproducible from its script, Qwen's special ids, lossless text."""

from __future__ import annotations

import unicodedata

import hypothesis
import hypothesis.strategies as st
import pytest
from tokenizers import Tokenizer

from robot_r1_jax.model import config as config_lib
from robot_r1_jax.model import processor
from robot_r1_jax.model import tokenizer_asset

ADDED = tokenizer_asset.SPECIAL_TOKENS + tokenizer_asset.NON_SPECIAL_ADDED_TOKENS
ROBOT_TEXT = ("You are a Franka Panda robot assistant for task planning and execution.\n"
              "Current robot state: Position: [0.281, -0.104, 0.913]\n"
              "[[B]] move slightly forward, left and up\n"
              "<think> The gripper is above the cup. </think> <answer> [[B]] </answer>")


def test_asset_is_reproducible_byte_for_byte(tmp_path):
  written = tokenizer_asset.write_asset(tmp_path)
  shipped = sorted(p.name for p in processor.TOKENIZER_ASSET_DIR.iterdir())
  assert sorted(p.name for p in written) == shipped == ["tokenizer.json", "tokenizer_config.json"]
  for name in shipped:
    assert (tmp_path / name).read_bytes() == (processor.TOKENIZER_ASSET_DIR / name).read_bytes(), (
        f"{name} differs from a fresh run of tokenizer_asset: regenerate the asset with "
        "`python -m robot_r1_jax.model.tokenizer_asset --out robot_r1_jax/model/assets/tokenizer`")


def test_cli_writes_the_asset(tmp_path, capsys):
  tokenizer_asset.main(["--out", str(tmp_path / "new")])
  assert "tokenizer.json" in capsys.readouterr().out
  assert ((tmp_path / "new" / "tokenizer.json").read_bytes()
          == (processor.TOKENIZER_ASSET_DIR / "tokenizer.json").read_bytes())


def test_write_asset_rejects_a_file_as_out(tmp_path):
  target = tmp_path / "file"
  target.write_text("x")
  with pytest.raises(NotADirectoryError, match="--out"):
    tokenizer_asset.write_asset(target)


def test_vocabulary_layout():
  tok = Tokenizer.from_file(str(processor.TOKENIZER_ASSET_DIR / "tokenizer.json"))
  regular = tok.get_vocab(with_added_tokens=False)
  assert sorted(regular.values()) == list(range(tokenizer_asset.NUM_REGULAR_TOKENS))
  assert tok.get_vocab_size(with_added_tokens=True) == 1022
  assert [tok.token_to_id(t) for t in ADDED] == list(range(1000, 1022))
  assert all(t not in regular for t in ADDED)


def test_special_ids_match_the_tiny_model_config(tokenizer):
  cfg = config_lib.tiny()
  ids = tokenizer.convert_tokens_to_ids
  assert ids("<|endoftext|>") == cfg.bos_token_id == 1000
  assert ids("<|im_end|>") == cfg.eos_token_id == tokenizer.eos_token_id == 1002
  assert ids("<|vision_start|>") == cfg.vision_start_token_id == 1009
  assert ids("<|vision_end|>") == cfg.vision_end_token_id == 1010
  assert ids("<|image_pad|>") == cfg.image_token_id == 1012
  assert ids("<|video_pad|>") == cfg.video_token_id == 1013
  assert tokenizer.pad_token == "<|endoftext|>"
  assert len(tokenizer) == 1022 <= cfg.text.vocab_size
  assert len(tokenizer) <= config_lib.small().text.vocab_size


def test_loads_as_qwen2_tokenizer_with_the_qwen_template(tokenizer):
  assert type(tokenizer).__name__ == "Qwen2Tokenizer"
  assert tokenizer.chat_template == tokenizer_asset.QWEN2_5_VL_CHAT_TEMPLATE
  # Qwen's split: 14 special tokens (dropped by skip_special_tokens), 8 ordinary added tokens.
  ids = [tokenizer.convert_tokens_to_ids(t) for t in ADDED]
  assert tokenizer.decode(ids, skip_special_tokens=True) == "".join(
      tokenizer_asset.NON_SPECIAL_ADDED_TOKENS)


def test_pretokenizer_regex_is_qwen2s():
  qwen2 = pytest.importorskip("transformers.models.qwen2.tokenization_qwen2")
  assert tokenizer_asset.QWEN2_PRETOKENIZE_REGEX == qwen2.PRETOKENIZE_REGEX


def test_robot_text_round_trips_compactly(tokenizer):
  ids = tokenizer(ROBOT_TEXT)["input_ids"]
  assert tokenizer.decode(ids) == ROBOT_TEXT
  assert max(ids) < 1000  # no added token is matched inside ordinary text
  # Trained merges: whole words, not bytes (digits stay single tokens by Qwen's split).
  assert len(ids) < len(ROBOT_TEXT) / 2.5
  assert tokenizer.tokenize(" Franka Panda robot") == ["ĠFranka", "ĠPanda", "Ġrobot"]


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(st.text(st.characters(exclude_categories=("Cs",)), max_size=80))
def test_any_text_round_trips(tokenizer, text):
  # The normaliser is NFC, as Qwen's: decoding gives the NFC form of the input.
  ids = tokenizer(text)["input_ids"]
  assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)
