"""Rewards: adversarial completions with literal expected rewards, and fuzzing."""

from __future__ import annotations

import math

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from robot_r1_jax.rl import rewards

R = "reasoning"
# (completion, expected format reward, expected answer reward) with the right option B.
ADVERSARIAL = [
    (f"<think>{R}</think><answer>[[B]]</answer>", 1.0, 1.0),
    (f"  <think>{R}</think>\n<answer> [[B]] </answer>\n", 1.0, 1.0),
    (f"<think>{R}</think><answer>\n\t[[B]]\n</answer>", 1.0, 1.0),
    ("<think></think><answer>[[B]]</answer>", 1.0, 1.0),  # empty reasoning is still a think block
    (f"<think>{R}</think>\u3000<answer>[[B]]</answer>\u3000", 1.0, 1.0),  # ideographic spaces
    ("<think>" + "x" * 100_000 + "</think><answer>[[B]]</answer>", 1.0, 1.0),  # very long
    ("<think>" + "[[A]] " * 5_000 + "</think><answer>[[B]]</answer>", 1.0, 1.0),  # options in think
    ("<think>机器人应向前移动 🤖 ñ</think><answer>[[B]]</answer>", 1.0, 1.0),  # unicode reasoning
    (f"<think>{R}</think><answer>[[A]]</answer>", 1.0, 0.0),  # wrong option
    (f"<think>{R}</think><answer>[[A]] or [[B]]</answer>", 1.0, 0.0),  # two options
    (f"<think>{R}</think><answer>[[B]] or [[A]]</answer>", 1.0, 0.0),
    (f"<think>{R}</think><answer>A or B</answer>", 1.0, 0.0),
    (f"<think>{R}</think><answer>B</answer>", 1.0, 0.0),  # bare letter: the prompt asks for [[B]]
    (f"<think>{R}</think><answer>The answer is [[B]]</answer>", 1.0, 0.0),
    (f"<think>{R}</think><answer>[[B]][[B]]</answer>", 1.0, 0.0),
    (f"<think>{R}</think><answer></answer>", 1.0, 0.0),  # empty answer
    (f"<think>{R}</think><answer>   </answer>", 1.0, 0.0),
    (f"<think>{R}</think><answer>[[b]]</answer>", 1.0, 0.0),  # lower case
    (f"<think>{R}</think><answer>[[ B ]]</answer>", 1.0, 0.0),
    (f"<think>{R}</think><answer>[B]</answer>", 1.0, 0.0),
    (f"<think>{R}</think><answer>[[B]</answer>", 1.0, 0.0),
    (f"<think>{R}</think><answer>[[AB]]</answer>", 1.0, 0.0),
    (f"<think>{R}</think><answer>[[Ｂ]]</answer>", 1.0, 0.0),  # full-width letter
    (f"<think>{R}</think><answer>［［B］］</answer>", 1.0, 0.0),  # full-width brackets
    (f"<think>{R}</think><answer>[[B]]\x00</answer>", 1.0, 0.0),  # NUL is not whitespace
    (f"<think>{R}</think><answer>[[B]]</answer><answer>[[B]]</answer>", 0.0, 0.0),  # two answers
    (f"<think>{R}</think><answer>[[B]]</answer><answer>[[A]]</answer>", 0.0, 0.0),
    (f"<think>{R}</think><answer><answer>[[B]]</answer></answer>", 0.0, 0.0),  # nested answer
    (f"<think>{R}<answer>[[B]]</answer></think><answer>[[B]]</answer>", 0.0, 0.0),  # in think
    (f"<think><think>{R}</think></think><answer>[[B]]</answer>", 0.0, 1.0),  # nested think
    (f"<think>{R}</think><think>{R}</think><answer>[[B]]</answer>", 0.0, 1.0),  # two thinks
    (f"<answer>[[B]]</answer><think>{R}</think>", 0.0, 1.0),  # answer before think
    ("<answer>[[B]]</answer>", 0.0, 1.0),  # no think
    (f"<think>{R}</think> so <answer>[[B]]</answer>", 0.0, 1.0),  # text between the blocks
    (f"Sure! <think>{R}</think><answer>[[B]]</answer>", 0.0, 1.0),  # text before
    (f"<think>{R}</think><answer>[[B]]</answer> Actually [[A]].", 0.0, 1.0),  # text after
    (f"<think>{R}</think><answer>[[B]]</answer>\u200b", 0.0, 1.0),  # zero-width space
    (f"</think><think>{R}<answer>[[B]]</answer>", 0.0, 1.0),  # think tags reversed
    (f"<think>{R}</think></answer>[[B]]<answer>", 0.0, 0.0),  # answer tags reversed
    (f"<think>{R}</think><answer>[[B]]</answer", 0.0, 0.0),  # unclosed
    (f"<think>{R}</think>", 0.0, 0.0),  # no answer
    (f"<THINK>{R}</THINK><ANSWER>[[B]]</ANSWER>", 0.0, 0.0),  # tags are case-sensitive
    ("[[B]]", 0.0, 0.0),
    ("", 0.0, 0.0),
]


@pytest.mark.parametrize("answer", ["B", "[[B]]", " [[B]] "])
@pytest.mark.parametrize("text,expected_format,expected_answer", ADVERSARIAL)
def test_adversarial_completions(text, expected_format, expected_answer, answer):
  assert rewards.format_reward(text) == expected_format
  assert rewards.answer_reward(text, answer) == expected_answer


XYZ_TARGET = "[0.100, -0.200, 0.300]"
XYZ_CASES = [
    ("<think>r</think><answer>[0.100, -0.200, 0.300]</answer>", 1.0),
    ("<answer>[+.1, -.2, .3]</answer>", 1.0),
    ("<answer>[0.2, -0.2, 0.3]</answer>", 0.9),  # L1 = 0.1
    ("<answer> [ 0.1 , -0.2 , 0.4 ] </answer>", 0.9),
    ("<answer>[0.0, 0.0, 0.0]</answer>", 0.4),  # L1 = 0.1 + 0.2 + 0.3
    ("<answer>[1.1, -0.2, 0.3]</answer>", 0.0),  # L1 = 1: clipped at 0
    ("<answer>[5, 5, 5]</answer>", 0.0),
    ("<answer>[1e-1, -0.2, 0.3]</answer>", 0.0),  # exponents rejected
    ("<answer>[nan, -0.2, 0.3]</answer>", 0.0),
    ("<answer>[inf, -0.2, 0.3]</answer>", 0.0),
    ("<answer>[0x1, 0, 0]</answer>", 0.0),
    ("<answer>[1_0, 0, 0]</answer>", 0.0),  # float() would accept the underscore
    ("<answer>[٠.1, -0.2, 0.3]</answer>", 0.0),  # Arabic-Indic digit: float() would accept it
    ("<answer>[" + "9" * 400 + ", 0, 0]</answer>", 0.0),  # parses to inf
    ("<answer>[0.1, -0.2]</answer>", 0.0),
    ("<answer>[0.1, -0.2, 0.3, 0.4]</answer>", 0.0),
    ("<answer>0.1, -0.2, 0.3</answer>", 0.0),
    ("<answer>[0.1; -0.2; 0.3]</answer>", 0.0),
    ("<answer>[0.1, -0.2, 0.3] or [0.2, 0.2, 0.2]</answer>", 0.0),
    ("<answer>[0.1, -0.2, 0.3]</answer><answer>[0.1, -0.2, 0.3]</answer>", 0.0),
    ("[0.1, -0.2, 0.3]", 0.0),
]


@pytest.mark.parametrize("text,expected", XYZ_CASES)
def test_xyz_reward(text, expected):
  assert rewards.xyz_reward(text, XYZ_TARGET) == pytest.approx(expected, abs=1e-12)
  assert rewards.xyz_reward(text, (0.1, -0.2, 0.3)) == pytest.approx(expected, abs=1e-12)


BINS_TARGET = "153 149 18"
BINS_CASES = [
    ("<think>r</think><answer>153 149 18</answer>", 1.0),
    ("<answer> 153  149\t18 </answer>", 1.0),
    ("<answer>0153 149 18</answer>", 1.0),  # leading zeros name the same bin
    ("<answer>154 149 18</answer>", math.exp(-1 / 16)),
    ("<answer>150 152 10</answer>", math.exp(-14 / 16)),  # 3 + 3 + 8 bins
    ("<answer>0 0 0</answer>", math.exp(-320 / 16)),
    ("<answer>153 149</answer>", 0.0),
    ("<answer>153 149 18 7</answer>", 0.0),
    ("<answer>153, 149, 18</answer>", 0.0),
    ("<answer>[153, 149, 18]</answer>", 0.0),  # a position, not bins
    ("<answer>153 149 -18</answer>", 0.0),
    ("<answer>153 149 18.0</answer>", 0.0),
    ("<answer>153 149 ١٨</answer>", 0.0),  # Arabic-Indic digits
    ("<answer>153 149 18</answer><answer>153 149 18</answer>", 0.0),
    ("153 149 18", 0.0),
]


@pytest.mark.parametrize("text,expected", BINS_CASES)
def test_bins_reward(text, expected):
  assert rewards.bins_reward(text, BINS_TARGET) == pytest.approx(expected, abs=1e-12)
  out = rewards.compute_rewards([text], [BINS_TARGET])
  assert out.open_ended[0] and out.answer[0] == 0
  assert out.xyz[0] == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("bad", ["1 2", "1 2 3 4", "[1, 2, 3]", "-1 2 3", None])
def test_bad_bins_reference_raises_naming_target(bad):
  with pytest.raises(ValueError, match="target="):
    rewards.bins_reward("<answer>1 2 3</answer>", bad)


@pytest.mark.parametrize("bad", ["", "1", "[[e]]", "[[A]] or [[B]]", "AB", None])
def test_bad_option_reference_raises_naming_answer(bad):
  with pytest.raises(ValueError, match="answer="):
    rewards.answer_reward("<answer>[[A]]</answer>", bad)


@pytest.mark.parametrize("bad", ["[1, 2]", "[1e3, 0, 0]", (1.0, 2.0), (0.0, float("nan"), 1.0),
                                 "A"])
def test_bad_xyz_reference_raises_naming_target(bad):
  with pytest.raises(ValueError, match="target="):
    rewards.xyz_reward("<answer>[0, 0, 0]</answer>", bad)


def test_compute_rewards_combines_components_with_weights():
  texts = [
      "<think>r</think><answer>[[C]]</answer>",  # format 1, answer 1
      "<answer>[[C]]</answer>",  # format 0, answer 1
      "<think>r</think><answer>[[D]]</answer>",  # format 1, answer 0
      "<think>r</think><answer>[0.5, 0.5, 0.5]</answer>",  # format 1, xyz 1 − 0.25
  ]
  answers = ["C", "[[C]]", "C", "[0.5, 0.25, 0.5]"]
  out = rewards.compute_rewards(texts, answers, rewards.RewardWeights(format=0.5, answer=2.0))
  np.testing.assert_array_equal(out.format, [1, 0, 1, 1])
  np.testing.assert_array_equal(out.answer, [1, 1, 0, 0])
  np.testing.assert_array_equal(out.xyz, [0, 0, 0, 0.75])
  np.testing.assert_array_equal(out.open_ended, [False, False, False, True])
  np.testing.assert_array_equal(out.total, [2.5, 2.0, 0.5, 1.25])
  assert out.total.dtype == np.float32
  assert out.summary() == pytest.approx({"reward/total": 6.25 / 4, "reward/format": 0.75,
                                         "reward/answer": 2 / 3, "reward/xyz": 0.75})


def test_summary_leaves_out_empty_subsets():
  out = rewards.compute_rewards(["<answer>[[A]]</answer>"], ["A"])
  assert set(out.summary()) == {"reward/total", "reward/format", "reward/answer"}


def test_compute_rewards_rejects_bad_batches():
  with pytest.raises(ValueError, match="texts has 2 entries but answers has 1"):
    rewards.compute_rewards(["a", "b"], ["A"])
  with pytest.raises(ValueError, match=r"answers\[1\]='left'"):
    rewards.compute_rewards(["a", "b"], ["A", "left"])


def test_reward_weights_must_be_finite():
  with pytest.raises(ValueError, match="RewardWeights.answer"):
    rewards.RewardWeights(answer=float("inf"))


# Fragments that make near-miss completions much likelier than uniform random text.
_FRAGMENTS = st.sampled_from([
    "<think>", "</think>", "<answer>", "</answer>", "<think", "answer>", "[[", "]]", "[", "]",
    "A", "B", "Z", "a", ",", ".", "-", "+", "0.5", "1", "e", "nan", " ", "\n", "\u3000", "ＡＢ",
    "٠", "🤖",
])
_TEXTS = st.lists(st.one_of(_FRAGMENTS, st.text(max_size=8)), max_size=24).map("".join)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(text=_TEXTS, letter=st.sampled_from("ABCD"),
                  target=st.tuples(*[st.floats(-2, 2)] * 3))
def test_rewards_never_raise_and_stay_in_range(text, letter, target):
  assert rewards.format_reward(text) in (0.0, 1.0)
  assert rewards.answer_reward(text, letter) in (0.0, 1.0)
  assert 0.0 <= rewards.xyz_reward(text, target) <= 1.0
  out = rewards.compute_rewards([text, text], [letter, f"[{target[0]:.3f}, 0, 0]"])
  assert np.isfinite(out.total).all()


_TAG_FREE = st.text(max_size=30).filter(lambda s: "<think>" not in s and "</think>" not in s and
                                        "<answer>" not in s and "</answer>" not in s)
_SPACE = st.text(alphabet=" \t\n", max_size=3)


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(think=_TAG_FREE, pad=st.tuples(_SPACE, _SPACE, _SPACE, _SPACE),
                  letter=st.sampled_from("ABCD"), right=st.sampled_from("ABCD"))
def test_well_formed_completions_are_rewarded(think, pad, letter, right):
  text = f"{pad[0]}<think>{think}</think>{pad[1]}<answer>{pad[2]}[[{letter}]]{pad[3]}</answer>"
  assert rewards.format_reward(text) == 1.0
  assert rewards.answer_reward(text, right) == float(letter == right)
