"""Closed-loop evaluation: a policy's answers move the simulated arm; the task's check scores it.

For each task, `episodes` seeded episodes (seeds from a stream the demo generator never uses; see
`data.sim.closed_loop`). At every keyframe the policy sees the front camera and the waypoint
question the model was trained on, built as the extractor builds it (the expert's next keyframe
position and three distractors, in the training data's answer format and prompt style); the arm
then moves to the position answered (the option's, the `[x, y, z]` written, or its bins' centre)
with the expert's orientation and gripper action; an unparsable answer holds the arm still. After
the last keyframe the task's own success check decides.

Policies answer in completion text, so every policy goes through the same parsing:
  * model: greedy decoding of the model (`model_policy`);
  * oracle: the right answer (the expert replayed; success should be ~100%);
  * random: a uniformly random option (or a uniform workspace position for `[x, y, z]` answers, or
    uniform bins for action tokens).

Episodes run side by side, `batch_size` at a time (one question per live episode per call of the
policy), each in its own pybullet clients.

Reported per policy: success rate per task and overall, and the mean L1 (metres) between answered
and expert positions over the keyframes with a parsable answer; per episode, a contact sheet (the
front camera at every keyframe, answer and expert positions written under it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw

from robot_r1_jax.data import atomic
from robot_r1_jax.data.loader import LoaderConfig, prompt_batch
from robot_r1_jax.data.mcqa import FrameContext, McqaConfig, Question, build_question, undiscretize
from robot_r1_jax.data.prompts import (ACTION_TOKENS, LETTERS, MCQA, WAYPOINT, format_bins,
                                       format_xyz)
from robot_r1_jax.data.rlbench_io import encode_png
from robot_r1_jax.data.sim import TASKS
from robot_r1_jax.data.sim.closed_loop import (ClosedLoopEpisode, EpisodeError, View,
                                               closed_loop_seed)
from robot_r1_jax.generate.sampler import Sampler
from robot_r1_jax.rl import rewards
from robot_r1_jax.stages.evaluate import check_sampler
from robot_r1_jax.train.metrics import ProgressBar

MAX_ATTEMPTS = 10  # seeds tried per episode until the expert's own run succeeds

# questions, their front-camera images -> one completion text each
Policy = Callable[[Sequence[Question], Sequence[np.ndarray]], list[str]]


@dataclasses.dataclass(frozen=True)
class ClosedLoopConfig:
  tasks: tuple[str, ...]
  episodes: int = 5  # per task
  seed: int = 0
  image_size: int = 128  # the training data's, so the model sees what it was trained on
  mcqa: McqaConfig = McqaConfig()  # the training data's answer format, prompt style, workspace
  batch_size: int = 8  # episodes stepped together
  sheets: bool = True  # write a contact sheet per episode
  progress: bool = True  # a progress bar over episodes (process 0)

  def __post_init__(self):
    if not self.tasks or self.episodes < 1 or self.batch_size < 1:
      raise ValueError(f"closed loop needs tasks (got {self.tasks}), episodes >= 1 (got "
                       f"{self.episodes}) and batch_size >= 1 (got {self.batch_size})")
    unknown = sorted(set(self.tasks) - set(TASKS))
    if unknown:
      raise ValueError(f"no simulated task {unknown}; available: {', '.join(sorted(TASKS))}")


@dataclasses.dataclass(frozen=True)
class EpisodeResult:
  task: str
  seed: int
  success: bool
  keyframes: int
  answered: tuple[tuple[float, float, float] | None, ...]  # per keyframe; None: unparsable
  l1: float | None  # mean L1 metres, answered vs expert, over the parsed keyframes
  completions: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PolicyResult:
  policy: str
  episodes: tuple[EpisodeResult, ...]

  def success_rate(self, task: str | None = None) -> float:
    chosen = [e.success for e in self.episodes if task is None or e.task == task]
    return float(np.mean(chosen))

  def mean_l1(self) -> float | None:
    """Over every keyframe with a parsable answer, of every episode."""
    weighted = [(e.l1, sum(a is not None for a in e.answered)) for e in self.episodes
                if e.l1 is not None]
    count = sum(n for _, n in weighted)
    return sum(l1 * n for l1, n in weighted) / count if count else None

  def summary(self) -> dict[str, Any]:
    tasks = sorted({e.task for e in self.episodes})
    return {"success_rate": {**{t: self.success_rate(t) for t in tasks},
                             "all": self.success_rate()},
            "mean_l1": self.mean_l1(), "episodes": len(self.episodes)}


def table(results: Sequence[PolicyResult]) -> str:
  """Success rate per task (rows) and policy (columns), the overall rate and mean L1 last."""
  tasks = sorted({e.task for r in results for e in r.episodes})
  header = ["closed loop success", *(r.policy for r in results)]
  rows = [[t, *(f"{100 * r.success_rate(t):.0f}%" for r in results)] for t in tasks]
  rows.append(["all", *(f"{100 * r.success_rate():.0f}%" for r in results)])
  rows.append(["mean L1 (m)", *("-" if r.mean_l1() is None else f"{r.mean_l1():.3f}"
                                for r in results)])
  widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
  return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths))
                   for row in [header, *rows])


def write_json(results: Sequence[PolicyResult], path: str | os.PathLike[str]) -> None:
  """`closed_loop.json`: the summary per policy, and every episode."""
  data = {r.policy: {**r.summary(), "per_episode": [dataclasses.asdict(e) for e in r.episodes]}
          for r in results}
  atomic.write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


# ------------------------------------------------------------------------------------------------
# Policies.


def oracle_policy(questions: Sequence[Question], images: Sequence[np.ndarray]) -> list[str]:
  del images
  return [_completion(q.answer) for q in questions]


def random_policy(seed: int, mcqa: McqaConfig) -> Policy:
  rng = np.random.default_rng(seed)

  def policy(questions: Sequence[Question], images: Sequence[np.ndarray]) -> list[str]:
    del images
    if mcqa.answer_format == MCQA:
      return [_completion(f"[[{LETTERS[rng.integers(len(q.options))]}]]") for q in questions]
    if mcqa.answer_format == ACTION_TOKENS:
      return [_completion(format_bins(rng.integers(mcqa.action_bins, size=3))) for _ in questions]
    low, high = mcqa.workspace.low, mcqa.workspace.high
    return [_completion(format_xyz(rng.uniform(low, high))) for _ in questions]

  return policy


def model_policy(sampler: Sampler, loader: LoaderConfig, *, max_new_tokens: int,
                 batch_size: int) -> Policy:
  """Greedy completions of the sampler's model; batches are padded to `batch_size` rows (copies of
  the first), so every call has the same shapes and nothing recompiles as episodes end."""
  check_sampler(sampler)

  def policy(questions: Sequence[Question], images: Sequence[np.ndarray]) -> list[str]:
    pad = batch_size - len(questions)
    batch = prompt_batch([*questions, *[questions[0]] * pad], [*images, *[images[0]] * pad],
                         sampler.tokenizer, loader)
    out = sampler(batch.input_ids, batch.attention_mask, jax.random.key(0),
                  max_new_tokens=max_new_tokens, pixel_values=batch.pixel_values,
                  image_grid_thw=batch.image_grid_thw)
    return list(out.text[:len(questions)])

  return policy


def _completion(answer: str) -> str:
  return f"<think> </think> <answer> {answer} </answer>"


# ------------------------------------------------------------------------------------------------
# Episodes.


def run(name: str, policy: Policy, config: ClosedLoopConfig,
        out_dir: str | os.PathLike[str] | None = None) -> PolicyResult:
  """Every task's episodes under `policy`; contact sheets go to `out_dir/<name>/`."""
  specs = [(task, i) for task in config.tasks for i in range(config.episodes)]
  results = []
  with ProgressBar(len(specs), enabled=None if config.progress else False,
                   desc=f"closed loop {name}") as bar:
    for start in range(0, len(specs), config.batch_size):
      episodes = [_open(task, i, config) for task, i in specs[start:start + config.batch_size]]
      try:
        results += _step_together(episodes, policy, config)
      finally:
        for episode in episodes:
          episode.close()
      if out_dir is not None and config.sheets:
        for episode, result in zip(episodes, results[start:]):
          path = os.path.join(os.fspath(out_dir), name, f"{episode.task}_{episode.seed}.png")
          atomic.write_bytes(path, encode_png(contact_sheet(episode, result)))
      bar.update(len(results), {"success": float(np.mean([r.success for r in results]))})
  return PolicyResult(name, tuple(results))


def _open(task: str, episode: int, config: ClosedLoopConfig) -> ClosedLoopEpisode:
  problems = []
  for attempt in range(MAX_ATTEMPTS):
    try:
      return ClosedLoopEpisode(task, closed_loop_seed(config.seed, task, episode, attempt),
                               image_size=config.image_size)
    except EpisodeError as e:
      problems.append(str(e))
  raise EpisodeError(f"{task} episode {episode}: no seed in {MAX_ATTEMPTS} attempts gives an "
                     f"episode the expert completes: {'; '.join(problems)}")


def _step_together(episodes: Sequence[ClosedLoopEpisode], policy: Policy,
                   config: ClosedLoopConfig) -> list[EpisodeResult]:
  questions: list[list[Question]] = [[] for _ in episodes]
  texts: list[list[str]] = [[] for _ in episodes]
  answered: list[list[tuple[float, float, float] | None]] = [[] for _ in episodes]
  l1s: list[list[float]] = [[] for _ in episodes]
  while True:
    live = [(i, view) for i, e in enumerate(episodes) if (view := e.observe()) is not None]
    if not live:
      break
    asked = [_question(episodes[i], view, config) for i, view in live]
    answers = policy(asked, [view.image for _, view in live])
    for (i, view), question, text in zip(live, asked, answers):
      xyz = _position(text, question, config.mcqa)
      questions[i].append(question)
      texts[i].append(text)
      answered[i].append(xyz)
      if xyz is not None:
        l1s[i].append(float(np.abs(np.subtract(xyz, view.expert_xyz)).sum()))
      episodes[i].act(xyz)
  return [EpisodeResult(task=e.task, seed=e.seed, success=e.success(), keyframes=len(e.views),
                        answered=tuple(answered[i]), l1=float(np.mean(l1s[i])) if l1s[i] else None,
                        completions=tuple(texts[i]))
          for i, e in enumerate(episodes)]


def _question(episode: ClosedLoopEpisode, view: View, config: ClosedLoopConfig) -> Question:
  ctx = FrameContext(task=episode.task, episode=f"closed_loop/{episode.task}/{episode.seed}",
                     frame=view.frame, next_keyframe=view.index, description=episode.description,
                     state_xyz=view.state_xyz, next_xyz=view.expert_xyz)
  question = build_question(WAYPOINT, ctx, seed=config.seed, config=config.mcqa)
  assert question is not None  # waypoint questions always exist
  return question


def _position(text: str, question: Question,
              mcqa: McqaConfig) -> tuple[float, float, float] | None:
  """The position a completion answers: its option's, the `[x, y, z]` it writes, or the centre of
  the bins it writes (a bin number past the last is no answer)."""
  if question.answer_format == MCQA:
    letter = rewards.chosen_option(text)
    if letter is None or LETTERS.index(letter) >= len(question.options):
      return None
    return rewards.parse_xyz(question.options[LETTERS.index(letter)])
  if question.answer_format == ACTION_TOKENS:
    bins = rewards.answered_bins(text)
    if bins is None or max(bins) >= mcqa.action_bins:
      return None
    return undiscretize(bins, mcqa.workspace, mcqa.action_bins)
  return rewards.answered_xyz(text)


def contact_sheet(episode: ClosedLoopEpisode, result: EpisodeResult, tile: int = 160) -> np.ndarray:
  """The front camera at every keyframe, the answered and the expert position under each."""
  sheet = Image.new("RGB", (max(1, len(episode.views)) * tile, tile + 58), "white")
  draw = ImageDraw.Draw(sheet)
  for k, view in enumerate(episode.views):
    sheet.paste(Image.fromarray(view.image).resize((tile, tile), Image.NEAREST), (k * tile, 0))
    answered = result.answered[k]
    held = answered is not None and episode.moved[k] is None
    draw.multiline_text((k * tile + 4, tile + 4), "\n".join([
        f"keyframe {k}" + (" (unreachable: held)" if held else ""),
        "answer " + ("none (held)" if answered is None else format_xyz(answered)),
        "expert " + format_xyz(view.expert_xyz)]), fill="black")
  outcome = "success" if result.success else "failure"
  draw.text((4, 4), f"{episode.task} seed {episode.seed}: {outcome}",
            fill="green" if result.success else "red")
  return np.asarray(sheet)
