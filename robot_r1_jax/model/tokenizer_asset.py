"""Generates the package's tiny Qwen2-style tokenizer (model/assets/tokenizer) from text made here.

The real Qwen2.5-VL vocabulary has 151,643 byte-level BPE tokens; tests and small models need the
same machinery (byte-level BPE, Qwen's pre-tokenizer, special tokens, chat template) at a size that
keeps embedding tables tiny. This script trains 1000 byte-level BPE tokens with `tokenizers` on
Robot-R1-style prompt and answer text generated deterministically below, appends the 22 Qwen added
tokens in Qwen's order (so `<|endoftext|>` = 1000, `<|im_end|>` = 1002, `<|vision_start|>` = 1009,
`<|image_pad|>` = 1012), and writes `tokenizer.json` + `tokenizer_config.json` in the layout of
the Qwen2.5-VL hub files, which `transformers.AutoTokenizer.from_pretrained` loads as a
`Qwen2Tokenizer`.

Same inputs give the same files byte for byte (tests regenerate the asset and compare):

  python -m robot_r1_jax.model.tokenizer_asset --out robot_r1_jax/model/assets/tokenizer
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
from typing import Any, Iterator, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers

NUM_REGULAR_TOKENS = 1000

# Qwen2's pre-tokenizer split (transformers' models/qwen2/tokenization_qwen2.py, PRETOKENIZE_REGEX):
# digits are split one by one, so numbers never merge into multi-digit tokens.
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                           r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen's added tokens in Qwen's id order. The first 14 are special (skipped when decoding with
# skip_special_tokens); Qwen marks the tool-call and fill-in-the-middle markers as non-special.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                  "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                  "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                  "<|image_pad|>", "<|video_pad|>")
NON_SPECIAL_ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                            "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")

# The chat template shipped with Qwen/Qwen2.5-VL-{3B,7B}-Instruct (chat_template.json), verbatim.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# ----------------------------------------------------------------------------------------------
# Training text: Robot-R1-style prompts and answers. Written here (not imported from data/) so that
# the asset never changes when the question generator's wording does.

_TASKS = {
    "pick_up_cup": ("pick up the {color} cup", "lift the {color} cup off the table"),
    "push_button": ("push the {color} button", "press down on the {color} button"),
    "put_rubbish_in_bin": ("put rubbish in bin", "drop the rubbish into the black bin",
                           "throw away the trash, leaving the objects on the table"),
    "phone_on_base": ("put the phone on the base", "put the phone back on the stand",
                      "place the mobile phone on its charging base"),
    "take_lid_off_saucepan": ("take the lid off the saucepan", "lift the lid off the pan",
                              "remove the lid from the saucepan and hold it above"),
    "reach_target": ("reach the {color} target", "touch the {color} ball with the gripper"),
    "stack_blocks": ("stack two {color} blocks", "place the {color} block on top of the other"),
    "open_drawer": ("open the top drawer", "slide the bottom drawer open"),
    "close_jar": ("close the {color} jar", "screw the lid onto the {color} jar"),
    "slide_block_to_target": ("slide the block to the {color} target",
                              "push the cube towards the {color} square"),
    "turn_tap": ("turn the left tap", "rotate the right handle of the tap"),
    "sweep_to_dustpan": ("sweep the dirt into the dustpan", "use the broom to sweep the dirt"),
    "put_item_in_drawer": ("put the item in the middle drawer", "store the item inside the drawer"),
    "meat_off_grill": ("take the chicken off the grill", "remove the steak from the grill"),
    "place_wine_at_rack_location": ("stack the wine bottle to the left of the rack",
                                    "put the wine bottle on the middle of the rack"),
    "insert_onto_square_peg": ("put the ring on the {color} spoke",
                               "insert the square ring onto the {color} peg"),
    "light_bulb_in": ("screw in the {color} light bulb", "install the {color} bulb in the lamp"),
    "put_groceries_in_cupboard": ("put the crackers in the cupboard",
                                  "move the soup can into the cupboard"),
    "put_money_in_safe": ("put the money away in the safe on the top shelf",
                          "leave the money in the safe"),
    "water_plants": ("water the plant", "pour water from the watering can onto the plant"),
    "unplug_charger": ("unplug the charger from the socket", "pull the charger out of the wall"),
    "open_microwave": ("open the microwave door", "pull the microwave open"),
    "toilet_seat_down": ("put the toilet seat down", "lower the toilet seat"),
}
_COLORS = ("red", "maroon", "lime", "green", "blue", "navy", "yellow", "cyan", "magenta", "silver",
           "gray", "orange", "olive", "purple", "teal", "azure", "violet", "rose", "black", "white")
_AXIS_WORDS = (("forward", "backward"), ("right", "left"), ("up", "down"))
_LETTERS = "ABCD"
_REASONS = (
    "The gripper is {rel} the {obj}, so it must move {dir} before it can close the fingers.",
    "Comparing the current position with the {obj}, the largest change is along the {axis} axis.",
    "The {obj} is {rel} the end effector; the next keyframe is where the gripper state changes.",
    "Since the arm has stopped near the {obj}, the next waypoint should be {rel} it.",
    "First the robot approaches the {obj}, then it grasps it and finally it lifts it {dir}.",
    "Option [[{letter}]] keeps the height above the table while moving {dir}, which avoids a "
    "collision with the {obj}.",
    "The distance to the {obj} is about {dist} metres, so only a slight movement is needed.",
    "Therefore the answer is the option whose coordinates are closest to the {obj}.",
    "Looking at the image, the {obj} stands {rel} the robot arm, roughly {dist} metres away.",
    "The remaining options either overshoot the {obj} or would require rotating the wrist.",
    "Because the fingers are open, the robot still has to approach and grasp the {obj}.",
    "After releasing the {obj}, the arm usually retracts {dir} to a safe height.",
    "Moving {dir} along the {axis} axis decreases the distance between the gripper and the {obj}.",
    "Option [[{letter}]] and the others differ mainly in their {axis} coordinate.",
    "I estimate the {obj} to be {rel} the camera centre, which matches a positive offset.",
    "Without any obstacle {rel} the {obj}, the straight path is feasible and shortest.",
)
_OBJECTS = ("cup", "button", "rubbish", "bin", "phone", "base", "lid", "saucepan", "block",
            "drawer", "handle", "jar", "target", "table", "dustpan", "broom", "tap", "sponge",
            "bottle", "plate", "shelf", "box", "tray", "cube")
_RELATIONS = ("above", "below", "behind", "in front of", "to the left of", "to the right of",
              "next to", "far from", "close to", "directly over")


def _xyz(rng: random.Random) -> str:
  return (f"[{rng.uniform(-0.3, 0.6):.3f}, {rng.uniform(-0.45, 0.45):.3f}, "
          f"{rng.uniform(0.75, 1.5):.3f}]")


def _movement(rng: random.Random) -> str:
  words = []
  for positive, negative in _AXIS_WORDS:
    step = rng.choice((-2, -1, 0, 0, 1, 2))
    if step:
      word = positive if step > 0 else negative
      words.append(word if abs(step) == 2 else f"slightly {word}")
  if not words:
    return "stay still"
  return "move " + (words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1])


def _prompt(rng: random.Random, task: str, kind: str) -> str:
  description = rng.choice(_TASKS[task]).format(color=rng.choice(_COLORS))
  lines = [
      "You are a Franka Panda robot assistant for task planning and execution.",
      f"Task ({task}): {description}.",
      "Visual input: the image is a front view of the workspace.",
      "Coordinate system: X points front (+) and back (-), Y points left (-) and right (+), "
      "Z points down (-) and up (+).",
  ]
  if kind in ("waypoint", "state"):
    lines.append("The origin [0.250, 0.000, 0.752] is the centre of the table top; units are "
                 "metres.")
    lines.append("Robot specification: the gripper measures 0.06 m (x) by 0.2 m (y) by 0.09 m "
                 "(z), and each finger is 0.04 m long.")
  if kind in ("waypoint", "movement"):
    lines.append(f"Current robot state: Position: {_xyz(rng)}")
  question = {
      "waypoint": "Which position will the end effector reach at the next keyframe?",
      "state": "What is the current position of the end effector?",
      "movement": "Which movement should the robot make to reach the next keyframe?",
  }[kind]
  lines.append(f"Question: {question}")
  for letter in _LETTERS:
    option = _movement(rng) if kind == "movement" else f"Position: {_xyz(rng)}"
    lines.append(f"[[{letter}]] {option}")
  lines.append("Output format: reason step by step inside <think> </think>, then give the final "
               "option inside <answer> </answer>.")
  lines.append("Example: <think> ... </think> <answer> [[A]] </answer>")
  return "\n".join(lines)


def _completion(rng: random.Random) -> str:
  sentences = []
  for template in rng.sample(_REASONS, 3):
    axis = rng.choice("XYZ")
    sentences.append(template.format(
        rel=rng.choice(_RELATIONS), obj=rng.choice(_OBJECTS), axis=axis,
        dir=rng.choice(_AXIS_WORDS[ord(axis) - ord("X")]), letter=rng.choice(_LETTERS),
        dist=f"{rng.uniform(0.01, 0.4):.3f}"))
  return f"<think> {' '.join(sentences)} </think> <answer> [[{rng.choice(_LETTERS)}]] </answer>"


def corpus(num_prompts: int = 600, seed: int = 0) -> Iterator[str]:
  """Yields the training text: `num_prompts` prompts, each followed by a sampled completion."""
  rng = random.Random(seed)
  tasks = sorted(_TASKS)
  for i in range(num_prompts):
    yield _prompt(rng, tasks[i % len(tasks)], ("waypoint", "state", "movement")[i % 3])
    yield _completion(rng)


# ----------------------------------------------------------------------------------------------
# Building and writing.


def build_tokenizer() -> Tokenizer:
  """Trains the byte-level BPE and appends the Qwen added tokens at ids 1000..1021."""
  # The same pipeline as Qwen2's tokenizer.json, so what is trained is what transformers rebuilds.
  tokenizer = Tokenizer(models.BPE(dropout=None, unk_token=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
  tokenizer.normalizer = normalizers.NFC()
  byte_level = dict(add_prefix_space=False, trim_offsets=False, use_regex=False)
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(**byte_level),
  ])
  tokenizer.post_processor = processors.ByteLevel(**byte_level)
  tokenizer.decoder = decoders.ByteLevel(**byte_level)
  # The full 256-symbol byte alphabet comes first, so any UTF-8 text encodes without unknowns.
  trainer = trainers.BpeTrainer(vocab_size=NUM_REGULAR_TOKENS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                special_tokens=[])
  tokenizer.train_from_iterator(corpus(), trainer=trainer)
  if tokenizer.get_vocab_size() != NUM_REGULAR_TOKENS:
    raise RuntimeError(
        f"BPE training produced {tokenizer.get_vocab_size()} tokens, not {NUM_REGULAR_TOKENS}: the "
        "corpus has too few distinct merges; enlarge corpus()")
  tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in SPECIAL_TOKENS])
  tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t in NON_SPECIAL_ADDED_TOKENS])
  for offset, token in enumerate(SPECIAL_TOKENS + NON_SPECIAL_ADDED_TOKENS):
    if tokenizer.token_to_id(token) != NUM_REGULAR_TOKENS + offset:
      raise RuntimeError(f"{token} got id {tokenizer.token_to_id(token)}, expected "
                         f"{NUM_REGULAR_TOKENS + offset}")
  return tokenizer


def tokenizer_config() -> dict[str, Any]:
  """The tokenizer_config.json of the Qwen2.5-VL hub files, with this vocabulary's ids."""
  added = {}
  for offset, token in enumerate(SPECIAL_TOKENS + NON_SPECIAL_ADDED_TOKENS):
    added[str(NUM_REGULAR_TOKENS + offset)] = {
        "content": token, "lstrip": False, "normalized": False, "rstrip": False,
        "single_word": False, "special": token in SPECIAL_TOKENS}
  return {
      "add_bos_token": False,
      "add_prefix_space": False,
      "added_tokens_decoder": added,
      "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
      "bos_token": None,
      "chat_template": QWEN2_5_VL_CHAT_TEMPLATE,
      "clean_up_tokenization_spaces": False,
      "eos_token": "<|im_end|>",
      "errors": "replace",
      "model_max_length": 131072,
      "pad_token": "<|endoftext|>",
      "split_special_tokens": False,
      "tokenizer_class": "Qwen2Tokenizer",
      "unk_token": None,
  }


def write_asset(out_dir: str | pathlib.Path) -> list[pathlib.Path]:
  """Writes tokenizer.json and tokenizer_config.json into `out_dir` (created); returns the paths."""
  out = pathlib.Path(out_dir)
  if out.exists() and not out.is_dir():
    raise NotADirectoryError(f"--out {out} exists and is not a directory")
  contents = {
      "tokenizer.json": build_tokenizer().to_str(pretty=True) + "\n",
      "tokenizer_config.json": json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n",
  }
  out.mkdir(parents=True, exist_ok=True)
  paths = []
  for name, text in contents.items():
    path = out / name
    # newline="\n": the same bytes on every platform, or the reproducibility check would fail.
    with open(path, "w", encoding="utf-8", newline="\n") as f:
      f.write(text)
    paths.append(path)
  return paths


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="directory to write the tokenizer files into")
  args = parser.parse_args(argv)
  for path in write_asset(args.out):
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
  main()
