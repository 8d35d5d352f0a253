"""Judges: the rule judge's stated thresholds, and the chat judge against a stub server on
127.0.0.1 (a good reply, malformed replies, an HTTP error, a timeout, a refused connection)."""

from __future__ import annotations

import json
import socket
import time

import pytest

from robot_r1_jax.data.prompts import ActionBins, Workspace
from robot_r1_jax.stages import judge as judge_lib
from robot_r1_jax.stages.judge import ChatJudge, RuleJudge, Verdict

REFERENCE = "[0.100, 0.200, 0.900]"


def _answer(text: str) -> str:
  return f"<think> </think> <answer> {text} </answer>"


@pytest.mark.parametrize("answer,score", [
    ("[0.100, 0.200, 0.900]", 3),
    ("[0.110, 0.210, 0.900]", 3),  # L1 2 cm: the 3's bound is inclusive
    ("[0.130, 0.200, 0.880]", 2),  # 5 cm
    ("[0.100, 0.270, 0.930]", 1),  # 10 cm
    ("[0.200, 0.200, 0.901]", 0),  # 10.1 cm
    ("[[A]]", 0),  # no position
])
def test_rule_judge_scores_positions_by_the_stated_l1_thresholds(answer, score):
  verdict = RuleJudge()("a prompt", REFERENCE, _answer(answer))
  assert verdict.score == score
  assert verdict.reason.startswith("L1 ") or verdict.reason == "no position in the answer block"


def test_rule_judge_reads_bins_with_the_datas_bins():
  bins = ActionBins(Workspace(low=(0.0, 0.0, 0.0), high=(1.0, 1.0, 1.0)), count=100)
  judge = RuleJudge(bins)
  assert judge("q", "10 20 30", _answer("10 20 30")) == Verdict(3, "L1 0.000 m")
  assert judge("q", "10 20 30", _answer("13 20 31")).score == 2  # 4 cm
  assert judge("q", "10 20 30", _answer("10 20 100")).score == 0  # past the last bin
  assert RuleJudge()("q", "10 20 30", _answer("10 20 30")).score is None  # bins unknown
  assert RuleJudge()("q", "[[B]]", _answer("[[B]]")).reason == "reference '[[B]]' is not a position"


def test_chat_judge_asks_with_the_rubric_and_reads_the_verdict(judge_stub):
  judge = ChatJudge(judge_stub.base_url + "/", "judge-model", api_key="secret")
  assert judge("Where next?", REFERENCE, _answer(REFERENCE)) == Verdict(3, "stub verdict")
  assert judge("Where next?", REFERENCE, _answer("[0.5, 0.5, 0.5]")) == Verdict(0, "stub verdict")
  request = judge_stub.requests[0]
  assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer secret"
  assert request["model"] == "judge-model" and request["temperature"] == 0
  assert request["messages"][0] == {"role": "system", "content": judge_lib.RUBRIC}
  assert request["messages"][1]["content"] == (
      f"Question:\nWhere next?\n\nReference answer:\n{REFERENCE}\n\nModel answer:\n"
      f"{_answer(REFERENCE)}")


def test_every_bad_reply_leaves_the_record_unjudged_with_the_reason(judge_stub):
  with socket.socket() as s:  # a port nothing listens on
    s.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
  stub = ChatJudge(judge_stub.base_url, "m", timeout_s=0.5)
  items = [("q", REFERENCE, _answer(REFERENCE)), ("q", REFERENCE, "MALFORMED"),
           ("q", REFERENCE, "NOTJSON"), ("q", REFERENCE, "ERROR"),
           ("q", REFERENCE, "OUTOFRANGE"), ("q", REFERENCE, "SLOW")]
  start = time.monotonic()
  verdicts = judge_lib.judge_records(stub, items, workers=3, progress=False)
  assert time.monotonic() - start < 3  # the slow reply was not waited for
  assert verdicts[0] == Verdict(3, "stub verdict")
  assert [v.score for v in verdicts[1:]] == [None] * 5
  reasons = [v.reason for v in verdicts[1:]]
  assert reasons[0].startswith("malformed reply (no score 0-3): Looks right to me.")
  assert reasons[1] == "malformed reply (not a chat completion): <html>oops</html>"
  assert reasons[2] == f"HTTP 500 from {stub.url}"
  assert reasons[3].startswith("malformed reply (no score 0-3): ```json")
  assert reasons[4] == f"no reply from {stub.url} within 0.5 s"
  refused = ChatJudge(closed, "m")("q", REFERENCE, _answer(REFERENCE))
  assert refused == Verdict(None, f"connection refused by {closed}/chat/completions")


def test_a_judge_that_raises_costs_one_record_and_the_report_counts_reasons(tmp_path):
  def flaky(prompt, reference, completion):
    if completion == "boom":
      raise RuntimeError("judge crashed")
    return RuleJudge()(prompt, reference, completion)

  verdicts = judge_lib.judge_records(flaky, [("q", REFERENCE, _answer(REFERENCE)),
                                             ("q", REFERENCE, "boom")], progress=False)
  assert verdicts[1] == Verdict(None, "the judge failed: RuntimeError: judge crashed")
  report = judge_lib.JudgeReport("rule", tuple(
      {"record_index": i, "question_type": "waypoint", "task": "cup", "reference": REFERENCE,
       "completion": c, "score": v.score, "reason": v.reason}
      for i, (c, v) in enumerate(zip([_answer(REFERENCE), "boom"], verdicts))))
  report.write(tmp_path / "judge.json")
  data = json.loads((tmp_path / "judge.json").read_text())
  assert (data["count"], data["judged"], data["mean_score"]) == (2, 1, 3.0)
  assert data["unjudged"] == {"the judge failed: RuntimeError: judge crashed": 1}
  assert data["by_type"]["waypoint"]["judged"] == 1 and len(data["records"]) == 2
  assert report.table().splitlines()[-1].split() == ["all", "2", "1", "3.00"]
