"""Prompt text: golden files for a fixed input, and the paper's section order per question type."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from robot_r1_jax.data import mcqa, prompts

GOLDEN = pathlib.Path(__file__).parent / "golden"
CTX = mcqa.FrameContext(task="pick_up_cup", episode="pick_up_cup/variation0/episode0", frame=10,
                        next_keyframe=37, description="pick up the red cup",
                        state_xyz=(0.2784, -0.0121, 1.1543), next_xyz=(0.3011, 0.0846, 0.8122))


@pytest.mark.parametrize("name, question_type, answer_format, answer", [
    ("prompt_waypoint", "waypoint", "mcqa", "[[A]]"),
    ("prompt_current_state", "current_state", "mcqa", "[[D]]"),
    ("prompt_movement", "movement", "mcqa", "[[C]]"),
    ("prompt_waypoint_xyz", "waypoint", "xyz", "[0.301, 0.085, 0.812]"),
    # (0.3011 + 0.3) / 1.0 · 256 = 153.9; (0.0846 + 0.5) / 1.0 · 256 = 149.7;
    # (0.8122 − 0.752) / 0.848 · 256 = 18.2.
    ("prompt_waypoint_action_tokens", "waypoint", "action_tokens", "153 149 18"),
])
def test_prompt_matches_golden_file(name, question_type, answer_format, answer):
  q = mcqa.build_question(question_type, CTX, seed=0,
                          config=mcqa.McqaConfig(answer_format=answer_format))
  assert q.prompt + "\n" == (GOLDEN / f"{name}.txt").read_text()
  assert q.answer == answer


@pytest.mark.parametrize("question_type, headings", [
    ("waypoint", ["Task", "Visual input", "Coordinate system", "Robot specification",
                  "Current robot state", "Question", "Output format"]),
    ("current_state", ["Task", "Visual input", "Coordinate system", "Robot specification",
                       "Question", "Output format"]),
    ("movement", ["Task", "Visual input", "Coordinate system", "Current robot state", "Question",
                  "Output format"]),
])
def test_sections_in_the_papers_order(question_type, headings):
  text = prompts.render_prompt(question_type, description="push the button", camera="front",
                               state_xyz=(0.1, 0.2, 0.9), options=["a", "b", "c", "d"],
                               metadata=prompts.RobotMetadata())
  assert text.startswith("You are the planning assistant of a Franka")  # The role comes first.
  assert [line[3:] for line in text.splitlines() if line.startswith("## ")] == headings
  assert "front view of the workspace" in text
  assert ("[0.250, 0.000, 0.752]" in text) == (question_type != "movement")  # Origin: positions.
  assert text.endswith("<think> ... </think> <answer> [[A]] </answer>")
  assert "[[A]] a\n[[B]] b\n[[C]] c\n[[D]] d" in text


@pytest.mark.parametrize("question_type, answer_format", [
    ("waypoint", "mcqa"), ("current_state", "mcqa"), ("movement", "mcqa"), ("waypoint", "xyz"),
    ("current_state", "xyz"), ("current_state", "action_tokens")])
def test_compact_prompt_is_the_papers_varying_sections(question_type, answer_format):
  paper, compact = (mcqa.build_question(
      question_type, CTX, seed=0, config=mcqa.McqaConfig(answer_format=answer_format,
                                                         prompt_style=style))
      for style in ("paper", "compact"))
  kept = [s for s in paper.prompt.split("\n\n")
          if s.startswith(("## Task", "## Current robot state", "## Question"))]
  assert compact.prompt == "\n\n".join(kept)
  assert [line[3:] for line in compact.prompt.splitlines() if line.startswith("## ")] == (
      ["Task"] + ["Current robot state"] * (question_type != "current_state") + ["Question"])
  # Same question otherwise: options, answer, targets.
  assert dataclasses.replace(compact, prompt=paper.prompt) == paper
  with pytest.raises(ValueError, match="prompt style='short'"):
    prompts.render_prompt(question_type, description="x", camera="front", state_xyz=(0, 0, 0),
                          options=None, metadata=prompts.RobotMetadata(), style="short")


def test_number_formatting_and_other_cameras():
  assert prompts.format_xyz((0.12345, -0.0004, 1.0)) == "[0.123, 0.000, 1.000]"
  text = prompts.render_prompt("movement", description="Open the drawer!", camera="left_shoulder",
                               state_xyz=(0, 0, 0), options=None, metadata=prompts.RobotMetadata())
  assert "## Task\nOpen the drawer!\n" in text
  assert "The image is the left shoulder camera view of the workspace." in text
  with pytest.raises(ValueError, match="empty"):
    prompts.render_prompt("movement", description=" ", camera="front", state_xyz=(0, 0, 0),
                          options=None, metadata=prompts.RobotMetadata())
  with pytest.raises(ValueError, match="expected 4 options"):
    prompts.render_prompt("movement", description="x", camera="front", state_xyz=(0, 0, 0),
                          options=["a"], metadata=prompts.RobotMetadata())
