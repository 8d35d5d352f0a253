"""bench/sweep.py: which runs it makes (shared or per-seed SFT, RL from the chosen target), what
each is trained and evaluated on, the table's mean ± half-spread and the beats-the-spread verdict."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
_SPEC = importlib.util.spec_from_file_location("sweep", ROOT / "bench" / "sweep.py")
sweep = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(sweep)


def _seed(sft: float, rl: float, movement_rl: float, rl_one_answer: tuple = ()) -> dict:
  return {"direct-SFT": {"waypoint": sft, "current_state": 0.25, "movement": 0.30, "all": None,
                         "one_answer": ["current_state"]},
          "direct-SFT→grpo": {"waypoint": rl, "current_state": 0.25, "movement": movement_rl,
                              "all": None, "one_answer": list(rl_one_answer)}}


def test_summary_means_spreads_and_verdicts():
  per_seed = {0: _seed(0.20, 0.41, 0.33), 1: _seed(0.26, 0.47, 0.25), 2: _seed(0.23, 0.44, 0.35)}
  table, stats = sweep.summarise(per_seed)
  assert stats["direct-SFT→grpo"]["waypoint"] == {
      "mean": pytest.approx(0.44), "spread": pytest.approx(0.06), "n": 3, "one_answer": False}
  assert stats["direct-SFT"]["current_state"]["one_answer"]
  assert stats["direct-SFT"]["all"]["n"] == 0  # no seed reported it: left out, not zero
  assert "| direct-SFT→grpo | 44.0 ± 3.0 | 25.0 ± 0.0 | 31.0 ± 5.0 | – |" in table
  lines = sweep.verdicts(stats, "direct-SFT")
  # waypoint: +21 points against a 6-point spread; current_state: no gain; movement: +1 point
  # against a 10-point spread (the RL runs' own spread counts, not only the baseline's).
  assert lines == [
      "direct-SFT→grpo vs direct-SFT on waypoint: +21.0 points, seed spread 6.0 -> beats it",
      "direct-SFT→grpo vs direct-SFT on current_state: +0.0 points, seed spread 0.0 -> "
      "does not beat it",
      "direct-SFT→grpo vs direct-SFT on movement: +1.0 points, seed spread 10.0 -> "
      "does not beat it"]
  # A gain made by one answer to (nearly) every question on every seed is a constant's.
  per_seed = {s: _seed(0.20, 0.44, 0.30, ("waypoint",)) for s in range(3)}
  assert sweep.verdicts(sweep.summarise(per_seed)[1], "direct-SFT")[0] == (
      "direct-SFT→grpo vs direct-SFT on waypoint: +24.0 points, seed spread 0.0 -> beats it only "
      "by giving one answer to >= 95% of the questions on every seed (a constant)")
  per_seed[1] = _seed(0.20, 0.44, 0.30)  # one seed varies its answers: not a constant
  assert sweep.verdicts(sweep.summarise(per_seed)[1], "direct-SFT")[0].endswith("-> beats it")


def _eval_json(path: pathlib.Path, correct: dict[int, bool | None], types: dict[int, str]):
  path.write_text(json.dumps({"records": [
      {"record_index": i, "question_type": types[i], "correct": c} for i, c in correct.items()]}))
  return path


def test_paired_counts_match_questions_by_record_index(tmp_path):
  types = {0: "movement", 1: "movement", 2: "waypoint", 3: "waypoint", 4: "current_state"}
  start = _eval_json(tmp_path / "start.json", {0: False, 1: True, 2: False, 3: True, 4: None},
                     types)
  # The run's records come in another order: they must be matched by index, not position.
  run = _eval_json(tmp_path / "run.json", {4: None, 3: True, 2: False, 1: False, 0: True}, types)
  assert sweep._paired(start, run) == {"waypoint": [0, 0], "current_state": [0, 0],
                                       "movement": [1, 1], "all": [1, 1]}
  fixed = _eval_json(tmp_path / "fixed.json", {0: True, 1: True, 2: True, 3: True, 4: None}, types)
  assert sweep._paired(start, fixed)["all"] == [2, 0]
  # Records of another split (an index the start lacks), or none at all: no pairing.
  assert sweep._paired(start, _eval_json(tmp_path / "other.json", {7: True}, types | {7: "x"})) \
      is None
  (tmp_path / "old.json").write_text(json.dumps({"overall": {"accuracy": 0.5}}))
  assert sweep._paired(start, tmp_path / "old.json") is None


def test_verdicts_show_each_seeds_fixed_and_broken_questions():
  per_seed = {s: _seed(0.20, 0.30 + s / 100, 0.30) for s in range(3)}
  for s, (f, b) in enumerate([(9, 2), (7, 3), (8, 1)]):
    per_seed[s]["direct-SFT→grpo"]["paired"] = {t: [f, b] for t in sweep.TYPES}
  line = sweep.verdicts(sweep.summarise(per_seed)[1], "direct-SFT")[0]
  assert line == ("direct-SFT→grpo vs direct-SFT on waypoint: +11.0 points, seed spread 2.0 -> "
                  "beats it; per seed it fixes / breaks 9/2 7/3 8/1 questions")


def _fake_launch(calls: list[list[str]]):
  """Records launch flag lists; an eval writes eval.json with an accuracy that encodes the run (and
  0.05 more on the test set)."""
  def launch(*flags: str) -> None:
    calls.append(list(flags))
    values = dict(f[2:].split("=", 1) for f in flags if "=" in f)  # the last of a flag wins
    workdir = pathlib.Path(values["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    if "--mode=eval" in flags:
      acc = (0.1 * int(values["seed"]) + (0.5 if "-grpo" in str(workdir) else 0.2) +
             (0.05 if values["data"] == "/test" else 0.0))
      (workdir / "eval.json").write_text(json.dumps(
          {"overall": {"accuracy": acc, "top_answer_share": 0.5},
           "by_type": {"waypoint": {"accuracy": acc, "top_answer_share": 1.0}}}))
  return launch


def test_shared_sft_checkpoint_rl_seeds_first_and_reasoning_budget(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(sweep, "_launch", _fake_launch(calls))
  runner = sweep.Sweep(tmp_path, ["--data=/d", "--max_new_tokens=32"], sft_seed=7,
                       reasoning_tokens=200)
  per_seed = sweep.run_sweep(runner, [0, 1], sweep.arms("grpo", ""), ["direct", "check"],
                             rl_from="check")
  trains = [(c[0], pathlib.Path(next(f for f in c if f.startswith("--workdir="))[10:])
             .relative_to(tmp_path).as_posix()) for c in calls if "--mode=eval" not in c]
  # One check-SFT run (seed 7) feeds both seeds' GRPO; the direct baseline comes last, once.
  assert trains == [("--stage=sft", "seed7/sft_check"), ("--stage=rl", "seed0/sft_check-grpo"),
                    ("--stage=rl", "seed1/sft_check-grpo"), ("--stage=sft", "seed7/sft_direct")]
  rl = [c for c in calls if c[0] == "--stage=rl"]
  assert all(f"--init_from={tmp_path / 'seed7' / 'sft_check'}" in c for c in rl)
  evals = {c[next(i for i, f in enumerate(c) if f.startswith("--workdir="))]: c
           for c in calls if "--mode=eval" in c}
  # Reasoning targets are evaluated with the larger budget (the last flag wins in absl).
  assert evals[f"--workdir={tmp_path / 'seed7' / 'sft_check'}"][-1] == "--max_new_tokens=200"
  assert [f for f in evals[f"--workdir={tmp_path / 'seed7' / 'sft_direct'}"]
          if f.startswith("--max_new_tokens")] == ["--max_new_tokens=32"]
  assert per_seed[1]["check-SFT"]["waypoint"] == pytest.approx(0.9)  # seed 7's checkpoint
  assert per_seed[1]["check-SFT→grpo"]["waypoint"] == pytest.approx(0.6)
  assert per_seed[0]["check-SFT→grpo"]["all"] == pytest.approx(0.5)
  assert per_seed[0]["check-SFT→grpo"]["one_answer"] == ["waypoint"]  # share 1.0, all 0.5
  # Finished runs are reused: a second sweep launches nothing.
  calls.clear()
  assert sweep.run_sweep(runner, [0, 1], sweep.arms("grpo", ""), ["direct", "check"],
                         "check") == per_seed
  assert calls == []


def test_rl_data_trains_rl_runs_only_and_every_run_is_evaluated_on_data(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(sweep, "_launch", _fake_launch(calls))
  runner = sweep.Sweep(tmp_path, ["--data=/all"], sft_seed=0, reasoning_tokens=64,
                       rl_data=pathlib.Path("/movement"))
  sweep.run_sweep(runner, [0], sweep.arms("grpo", ""), ["check"], rl_from="check")
  data = lambda c: [f for f in c if f.startswith("--data=")][-1]  # absl keeps the last one
  rl = [c for c in calls if c[0] == "--stage=rl"]
  others = [c for c in calls if c[0] != "--stage=rl"]
  assert [data(c) for c in rl] == ["--data=/movement"]
  assert len(others) == 3 and all(data(c) == "--data=/all" for c in others)  # SFT, 2 evals


def test_test_data_evaluates_every_run_again_and_is_what_is_reported(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(sweep, "_launch", _fake_launch(calls))
  plain = sweep.Sweep(tmp_path, ["--data=/all"], sft_seed=0, reasoning_tokens=64)
  before = sweep.run_sweep(plain, [0], sweep.arms("grpo", ""), ["check", "direct"],
                           rl_from="check")
  calls.clear()
  # Finished runs are not retrained: each is only evaluated on the test set, from its checkpoint.
  tested = sweep.Sweep(tmp_path, ["--data=/all"], sft_seed=0, reasoning_tokens=64,
                       test_data=pathlib.Path("/test"))
  after = sweep.run_sweep(tested, [0], sweep.arms("grpo", ""), ["check", "direct"],
                          rl_from="check")
  runs = [tmp_path / "seed0" / r for r in ("sft_check", "sft_check-grpo", "sft_direct")]
  assert [c[:3] for c in calls] == [["--mode=eval", f"--init_from={r}", f"--workdir={r / 'test'}"]
                                    for r in runs]
  assert all(c[-1] == "--data=/test" for c in calls)
  assert calls[0][-2] == "--max_new_tokens=64"  # a reasoning target keeps its budget
  assert not any(f.startswith("--max_new_tokens") for f in calls[1] + calls[2])
  for method in before[0]:
    assert after[0][method]["waypoint"] == pytest.approx(before[0][method]["waypoint"] + 0.05)
  calls.clear()
  assert sweep.run_sweep(tested, [0], sweep.arms("grpo", ""), ["check", "direct"],
                         rl_from="check") == after
  assert calls == []


def test_flagfile_arms_add_their_flags_after_the_common_ones(tmp_path, monkeypatch):
  assert sweep.arms("grpo", "gspo=objectives/gspo.cfg,dapo=my/dapo.cfg") == {
      "grpo": ["--algo=grpo"], "gspo": ["--flagfile=objectives/gspo.cfg"],
      "dapo": ["--flagfile=my/dapo.cfg"]}
  assert sweep.arms("", "gspo=g.cfg") == {"gspo": ["--flagfile=g.cfg"]}
  with pytest.raises(SystemExit, match="'gspo' is not NAME=FLAGFILE"):
    sweep.arms("", "gspo")
  with pytest.raises(SystemExit, match="arm 'grpo' is named twice"):
    sweep.arms("grpo", "grpo=g.cfg")
  calls = []
  monkeypatch.setattr(sweep, "_launch", _fake_launch(calls))
  runner = sweep.Sweep(tmp_path, ["--data=/all", "--clip_high=0.3"], sft_seed=0,
                       reasoning_tokens=64, rl_data=pathlib.Path("/movement"))
  per_seed = sweep.run_sweep(runner, [0], sweep.arms("grpo", "gspo=objectives/gspo.cfg"),
                             ["check"], rl_from="check")
  assert list(per_seed[0]) == ["check-SFT", "check-SFT→grpo", "check-SFT→gspo"]
  rl = {c[2][len("--workdir="):]: c for c in calls if c[0] == "--stage=rl"}
  gspo = rl[str(tmp_path / "seed0" / "sft_check-gspo")]
  # The arm's flagfile comes after the common flags (it wins), the RL data last.
  assert gspo.index("--flagfile=objectives/gspo.cfg") > gspo.index("--clip_high=0.3")
  assert gspo[-1] == "--data=/movement"
  assert "--algo=grpo" in rl[str(tmp_path / "seed0" / "sft_check-grpo")]


@pytest.mark.parametrize("arm", sorted((ROOT / "bench" / "arms").glob("*.cfg")),
                         ids=lambda p: p.stem)
def test_shipped_arms_parse_at_the_readme_scale(arm):
  from absl import flags
  from absl.testing import flagsaver

  from robot_r1_jax.launch import flagfiles
  from robot_r1_jax.launch import flags as launch_flags

  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(flagfiles.expand(["launch", "--max_new_tokens=160", f"--flagfile={arm}"]))
    step = launch_flags.run_config().rl.step
  assert step.max_new_tokens == 160 and step.shaping.overlong_buffer <= 160
