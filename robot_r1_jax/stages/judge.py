"""Judges for open-ended answers: (question, reference, completion) → a score 0–3 and a reason.

Robot-R1 Bench scores open-ended answers 0–3 with a judge model. Two judges, one protocol:
  * `RuleJudge`, for position answers (`[x, y, z]`, or action-token bins given the data's
    `ActionBins`): by the L1 distance between the answered and the right position,
    3 if ≤ 2 cm, 2 if ≤ 5 cm, 1 if ≤ 10 cm, else 0 (`RULE_THRESHOLDS`); no position in the answer
    block scores 0.
  * `ChatJudge`, for users who serve a judge model behind an OpenAI-compatible chat-completions
    API (vLLM, SGLang, llama.cpp's server, OpenAI): one POST to `{base_url}/chat/completions` per
    record, temperature 0, asking for `{"score": 0-3, "reason": "..."}` as JSON.

A judge never raises for a record: a reply it cannot use (a timeout, a refused connection, an HTTP
error, content that is not that JSON, a score outside 0–3) gives `Verdict(None, reason)`, an
unjudged record that says why, and the run goes on. `judge_records` judges many records on a few
threads (the calls wait on the network) with a progress bar; `judge_result` judges the open-ended
records of an evaluation into a `JudgeReport`: `judge.json` and a table per question type.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import re
import socket
import urllib.error
import urllib.request
from typing import Any, Protocol, Sequence

import numpy as np

from robot_r1_jax.data import atomic, records
from robot_r1_jax.data.mcqa import undiscretize
from robot_r1_jax.data.prompts import ActionBins
from robot_r1_jax.rl import rewards
from robot_r1_jax.stages.evaluate import EvalResult
from robot_r1_jax.train.metrics import ProgressBar

RULE_THRESHOLDS = (0.02, 0.05, 0.10)  # metres of L1: at most these score 3, 2, 1; beyond, 0
RUBRIC = (
    "You grade a robot-planning model's answer to a question about a robot arm's motion. Compare "
    "the model's answer with the reference answer and score it: 3 = equivalent to the reference; "
    "2 = close, with a small error; 1 = partly right; 0 = wrong, missing or not an answer. Reply "
    'with only a JSON object: {"score": <0, 1, 2 or 3>, "reason": "<one sentence>"}.')


@dataclasses.dataclass(frozen=True)
class Verdict:
  score: int | None  # 0–3; None: unjudged (see `reason`)
  reason: str


class Judge(Protocol):
  def __call__(self, prompt: str, reference: str, completion: str) -> Verdict:
    """Scores `completion` (the model's whole text) for the question `prompt` against
    `reference` (the record's answer); never raises."""


@dataclasses.dataclass(frozen=True)
class RuleJudge:
  """Position answers by L1 distance (see the module doc)."""

  bins: ActionBins | None = None  # reads bin answers as their centres; without it, [x, y, z] only
  thresholds: tuple[float, float, float] = RULE_THRESHOLDS

  def __call__(self, prompt: str, reference: str, completion: str) -> Verdict:
    del prompt
    if rewards.is_bins(reference):
      if self.bins is None:
        return Verdict(None, "bin answers need the data's bins")
      right = undiscretize(rewards.parse_bins(reference), self.bins.workspace, self.bins.count)
      answered = rewards.answered_bins(completion)
      if answered is not None and max(answered) >= self.bins.count:
        return Verdict(0, f"bin past the last ({self.bins.count - 1})")
      answered = None if answered is None else undiscretize(answered, self.bins.workspace,
                                                             self.bins.count)
    else:
      try:
        right = rewards.parse_xyz(reference)
      except ValueError:
        return Verdict(None, f"reference {reference!r} is not a position")
      answered = rewards.answered_xyz(completion)
    if answered is None:
      return Verdict(0, "no position in the answer block")
    # To the micron: answers print millimetres, and 0.03 + 0.02 must not land above 0.05.
    l1 = round(float(np.abs(np.subtract(answered, right)).sum()), 6)
    score = sum(l1 <= t for t in self.thresholds)
    return Verdict(score, f"L1 {l1:.3f} m")


@dataclasses.dataclass(frozen=True)
class ChatJudge:
  """A judge model behind an OpenAI-compatible `/chat/completions` endpoint."""

  base_url: str  # e.g. http://127.0.0.1:8000/v1
  model: str
  timeout_s: float = 30.0
  api_key: str | None = None  # sent as a bearer token

  @property
  def url(self) -> str:
    return self.base_url.rstrip("/") + "/chat/completions"

  def __call__(self, prompt: str, reference: str, completion: str) -> Verdict:
    body = {"model": self.model, "temperature": 0, "messages": [
        {"role": "system", "content": RUBRIC},
        {"role": "user", "content": f"Question:\n{prompt}\n\nReference answer:\n{reference}\n\n"
                                    f"Model answer:\n{completion}"}]}
    headers = {"Content-Type": "application/json",
               **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})}
    request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
    try:
      with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
        raw = response.read()
    except urllib.error.HTTPError as e:
      return Verdict(None, f"HTTP {e.code} from {self.url}")
    except urllib.error.URLError as e:
      return Verdict(None, _unreachable(e.reason, self))
    except OSError as e:  # a timeout while reading the reply, a reset connection
      return Verdict(None, _unreachable(e, self))
    return parse_reply(raw)


def _unreachable(error: Any, judge: ChatJudge) -> str:
  if isinstance(error, (TimeoutError, socket.timeout)):
    return f"no reply from {judge.url} within {judge.timeout_s:g} s"
  if isinstance(error, ConnectionRefusedError):
    return f"connection refused by {judge.url}"
  return f"cannot reach {judge.url}: {error}"


def parse_reply(raw: bytes) -> Verdict:
  """A chat-completions response body → the verdict in its first choice's message."""
  try:
    content = json.loads(raw)["choices"][0]["message"]["content"]
  except (ValueError, KeyError, IndexError, TypeError):
    return Verdict(None, f"malformed reply (not a chat completion): {_clip(raw)}")
  found = re.search(r"\{.*\}", content, re.S) if isinstance(content, str) else None
  try:
    verdict = json.loads(found.group(0)) if found else None
  except ValueError:
    verdict = None
  score = verdict.get("score") if isinstance(verdict, dict) else None
  if type(score) is not int or not 0 <= score <= 3:  # bool is an int; it is not a score
    return Verdict(None, f"malformed reply (no score 0-3): {_clip(content)}")
  return Verdict(score, str(verdict.get("reason", "")))


def _clip(text: Any, limit: int = 120) -> str:
  text = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
  return text if len(text) <= limit else text[:limit] + "…"


def judge_records(judge: Judge, items: Sequence[tuple[str, str, str]], *, workers: int = 8,
                  progress: bool = True) -> list[Verdict]:
  """Verdicts for (prompt, reference, completion) items, in order; a judge that raises anyway
  gives an unjudged verdict naming the error."""

  def one(item: tuple[str, str, str]) -> Verdict:
    try:
      return judge(*item)
    except Exception as e:  # noqa: BLE001 - a user's judge: one bad record must not end the run
      return Verdict(None, f"the judge failed: {type(e).__name__}: {e}")

  verdicts = []
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool, ProgressBar(
      len(items), enabled=None if progress else False, desc="judge") as bar:
    for verdict in pool.map(one, items):
      verdicts.append(verdict)
      bar.update(len(verdicts), {"judged": sum(v.score is not None for v in verdicts)})
  return verdicts


def judge_result(judge: Judge, name: str, result: EvalResult, data_dir: str | os.PathLike[str],
                 split: str = "val", *, progress: bool = True) -> JudgeReport:
  """Judges the open-ended records of an evaluation of `split` of `data_dir` (their prompts are
  read back from the split by record index)."""
  chosen = [r for r in result.records if r.open_ended]
  if any(r.record_index is None for r in chosen):
    raise ValueError("judging needs the evaluated records' indices in their split")
  source = records.open_split(data_dir, split).source if chosen else None
  prompts = [records.decode_record(source[r.record_index]).question.prompt for r in chosen]
  verdicts = judge_records(judge, [(p, r.answer, r.completion) for p, r in zip(prompts, chosen)],
                           progress=progress)
  return JudgeReport(name, tuple(
      {"record_index": r.record_index, "question_type": r.question_type, "task": r.task,
       "reference": r.answer, "completion": r.completion, "score": v.score, "reason": v.reason}
      for r, v in zip(chosen, verdicts)))


@dataclasses.dataclass(frozen=True)
class JudgeReport:
  """Verdicts on a split's open-ended records, with the records' labels."""

  judge: str
  records: tuple[dict[str, Any], ...]  # record_index, question_type, task, reference, completion,
  #                                      score, reason

  def summary(self, question_type: str | None = None) -> dict[str, Any]:
    chosen = [r for r in self.records if question_type in (None, r["question_type"])]
    scores = [r["score"] for r in chosen if r["score"] is not None]
    return {"count": len(chosen), "judged": len(scores),
            "mean_score": float(np.mean(scores)) if scores else None,
            "unjudged": dict(collections.Counter(r["reason"] for r in chosen
                                                 if r["score"] is None))}

  def write(self, path: str | os.PathLike[str]) -> None:
    types = sorted({r["question_type"] for r in self.records})
    data = {"judge": self.judge, **self.summary(),
            "by_type": {t: self.summary(t) for t in types}, "records": list(self.records)}
    atomic.write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())

  def table(self) -> str:
    rows = [(t, self.summary(t)) for t in sorted({r["question_type"] for r in self.records})]
    lines = [f"{'judge: ' + self.judge:<24} {'count':>5} {'judged':>6} {'mean score (0-3)':>16}"]
    for name, s in [*rows, ("all", self.summary())]:
      mean = "-" if s["mean_score"] is None else f"{s['mean_score']:.2f}"
      lines.append(f"{name:<24} {s['count']:>5} {s['judged']:>6} {mean:>16}")
    return "\n".join(lines)
