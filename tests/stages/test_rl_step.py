"""The RL step end to end on the tiny model: estimator formulas, no recompilation, non-finite guard."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from robot_r1_jax.generate import sampling
from robot_r1_jax.model import config as config_lib
from robot_r1_jax.model import packing
from robot_r1_jax.model.qwen2_5_vl import init_model
from robot_r1_jax.rl import kl as kl_lib
from robot_r1_jax.rl import advantages as adv_lib
from robot_r1_jax.rl import losses, rewards, shaping
from robot_r1_jax.stages import rl_step
from robot_r1_jax.stages.rl_step import Learner, LearnerConfig, completion_width
from robot_r1_jax.train.optim import OptimizerConfig, build_optimizer
from robot_r1_jax.train import scoring

from testing import (EOS, PAD, grouped_rows, image_prompts, make_sampler, question_batch,
                     two_questions)

G = 4
PROMPTS = 2


@pytest.fixture(scope="module")
def setup(tokenizer, one_device_mesh):
  return tokenizer, two_questions(tokenizer), one_device_mesh


def _learner(setup, reward_fn=None, temperature=1.0, stop_tokens=(EOS, PAD), **overrides):
  tokenizer, _, mesh = setup
  model = init_model(config_lib.tiny(), seed=0, mesh=mesh)
  sampler = make_sampler(
      model, tokenizer, mesh=mesh, stop_tokens=stop_tokens, num_samples=G,
      prompt_buckets=(64,), new_token_buckets=(16,),
      sampling=sampling.SamplingParams(temperature=temperature, top_p=1.0, top_k=0))
  optimizer, schedule = build_optimizer(OptimizerConfig(learning_rate=1e-3, weight_decay=0.0),
                                        total_steps=10)
  cfg = LearnerConfig(**{"num_generations": G, "train_batch_size": PROMPTS,
                         "micro_batch_size": 4, "max_new_tokens": 16, **overrides})
  return Learner(model, optimizer, sampler, cfg, mesh, lr_schedule=schedule,
                 reward_fn=reward_fn)


def _parity_reward(texts, answers):
  """A non-degenerate reward on random text: 1 when the completion has an even length."""
  del answers
  total = np.array([float(len(t) % 2 == 0) for t in texts], np.float32)
  zeros = np.zeros_like(total)
  return rewards.RewardOutput(format=zeros, answer=total, xyz=zeros,
                              open_ended=np.zeros(len(texts), bool), total=total)


@pytest.mark.parametrize("algo", ["grpo", "dr_grpo", "rloo", "reinforce_pp",
                                  "reinforce_pp_baseline"])
def test_advantages_follow_each_estimator(setup, algo):
  learner = _learner(setup, _parity_reward, algo=algo)
  result = learner.step(setup[1], jax.random.key(1))
  scores = result.scores.reshape(PROMPTS, G)
  assert 0 < scores.mean() < 1, "the test reward should not be degenerate"
  mask = result.completion_mask.astype(bool)
  first = result.advantages[:, 0].reshape(PROMPTS, G)  # every completion has >= 1 token
  mean = scores.mean(1, keepdims=True)
  if algo == "grpo":
    want = (scores - mean) / (scores.std(1, ddof=1, keepdims=True) + 1e-6)
  elif algo == "dr_grpo":
    want = scores - mean
  elif algo == "rloo":
    want = scores - (scores.sum(1, keepdims=True) - scores) / (G - 1)
  if algo.startswith("reinforce_pp"):  # whitened over every valid token of the batch
    valid = result.advantages[mask]
    np.testing.assert_allclose(valid.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(valid.var(ddof=1), 1.0, rtol=1e-4)
  else:
    np.testing.assert_allclose(first, want, rtol=1e-5, atol=1e-6)
    # Outcome estimators give every response token the sequence's advantage.
    rows = np.repeat(first.reshape(-1, 1), mask.shape[1], 1)
    np.testing.assert_allclose(result.advantages[mask], rows[mask], rtol=1e-6)
  assert np.all(result.advantages[~mask] == 0)
  assert np.isfinite(result.metrics["update/loss"])


def test_second_step_reuses_every_executable_and_moves_parameters(setup):
  learner = _learner(setup, _parity_reward, num_updates_per_rollout=2)
  before = np.asarray(learner.params["text"]["layers"]["mlp"]["up"].get_value()).copy()
  results = [learner.step(setup[1], jax.random.key(s)) for s in range(3)]
  assert learner.train_step._cache_size() == 1
  assert learner.log_probs_step._cache_size() == 1
  assert learner.sampler.traces.counts == {"prefill": 1, "decode": 1}
  after = np.asarray(learner.model.text.layers.mlp.up.get_value())
  assert not np.allclose(before, after), "the model the sampler reads was not updated"
  # Two passes over the rollout: the second sees the first's update, so ratios move off 1.
  assert all(r.metrics["update/ratio_max"] > 1.0 for r in results)
  assert all(r.metrics["update/learning_rate"] == pytest.approx(1e-3) for r in results)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_first_step_scores_the_policy_the_sampler_drew_from(setup, temperature):
  """At step 1 the policy is the reference: the KL between the sampler's log-probs and the
  learner's fresh scoring is 0 only if both use softmax(logits / τ), on the cut completions."""
  learner = _learner(setup, _parity_reward, temperature=temperature, max_new_tokens=5)
  result = learner.step(setup[1], jax.random.key(3))
  lengths = result.completion_mask.sum(1)
  assert lengths.max() <= 5 and result.completion_mask.shape[1] == 6  # 16-token bucket, 2-token steps
  assert abs(result.metrics["kl/policy_ref"]) < 1e-5


def test_completion_width_rounds_the_longest_up_to_a_step_of_the_bucket():
  width = lambda lengths, bucket, steps: completion_width(np.array(lengths), bucket, steps)
  assert width([3, 65, 40], 256, 8) == 96
  assert width([64], 256, 8) == 64
  assert width([250], 256, 8) == 256
  assert width([0, 0], 256, 8) == 32  # an all-empty rollout still has one column
  assert width([7], 10, 3) == 8  # ⌈10 / 3⌉ = 4-token steps
  assert width([9], 10, 3) == 10  # capped at the bucket
  assert width([5], 16, 1) == 16  # one step: never cut


def test_a_learner_step_on_packed_completions_is_the_padded_step(setup, monkeypatch):
  """Reference log-probs, the update and its metrics come out as on padded completions when each
  micro-batch's completions are packed (rows a multiple of 4 here: of 128, no tiny completion
  would pack)."""
  monkeypatch.setattr(packing, "_MULTIPLE", 4)
  chosen = []
  monkeypatch.setattr(rl_step, "packed_rows_for",
                      lambda *a: chosen.append(scoring.packed_rows_for(*a)) or chosen[-1])
  # One token in 7 stops a completion: lengths spread over the 16-token budget.
  stops = tuple(range(0, config_lib.tiny().text.vocab_size, 7))
  padded, packed = (_learner(setup, _parity_reward, stop_tokens=stops, pack_steps=steps)
                    for steps in (0, 4))
  want = padded.step(setup[1], jax.random.key(1))
  assert not chosen
  got = packed.step(setup[1], jax.random.key(1))
  assert chosen and all(rows is not None for rows in chosen), chosen
  lengths = want.completion_mask.sum(1)
  assert lengths.min() < lengths.max() / 2, lengths
  untimed = lambda metrics: {k: v for k, v in metrics.items() if not k.startswith("time/")}
  assert untimed(got.metrics) == pytest.approx(untimed(want.metrics), rel=1e-4, abs=1e-6)
  # Adam's first step moves each parameter by lr·g/(|g| + ε) (lr 1e-3): where a gradient is near
  # ε its float rounding shows in the step, so parameters agree to 1% of the step.
  for a, b in zip(jax.tree.leaves(packed.params), jax.tree.leaves(padded.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_prompt_share_is_the_run_of_one_prompt_inside_a_micro_batch():
  assert LearnerConfig(num_generations=8, micro_batch_size=16).prompt_share == 8
  assert LearnerConfig(num_generations=8, micro_batch_size=4).prompt_share == 4
  assert LearnerConfig(num_generations=4, train_batch_size=3, micro_batch_size=6).prompt_share == 2


def test_non_finite_rewards_skip_the_update(setup):
  def nan_reward(texts, answers):
    out = _parity_reward(texts, answers)
    return rewards.RewardOutput(format=out.format, answer=out.answer, xyz=out.xyz,
                                open_ended=out.open_ended, total=out.total * np.nan)

  learner = _learner(setup, nan_reward)
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(learner.params))
  result = learner.step(setup[1], jax.random.key(0))
  assert result.metrics["updates/skipped_non_finite"] == 1.0
  assert learner.bad_steps == 1
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(learner.params))
  jax.tree.map(np.testing.assert_array_equal, before, after)


def test_learner_config_checks():
  cfg = LearnerConfig(kl=kl_lib.KLPenalty(coef=0.0),
                      kl_reward=kl_lib.KLPenalty(coef=0.05, placement="reward"), micro_batch_size=5)
  assert not cfg.kl.active and cfg.kl_reward.active and cfg.needs_reference
  assert not LearnerConfig(kl=kl_lib.KLPenalty(coef=0.0)).needs_reference
  with pytest.raises(ValueError, match="kl goes in the loss and kl_reward in the reward"):
    LearnerConfig(kl=kl_lib.KLPenalty(placement="reward"))
  with pytest.raises(ValueError, match="micro_batch_size"):
    LearnerConfig(train_batch_size=3, num_generations=5, micro_batch_size=4)
  with pytest.raises(ValueError, match="grpo"):
    LearnerConfig(algo="ppo")
  with pytest.raises(ValueError, match="width_steps"):
    LearnerConfig(width_steps=0)
  with pytest.raises(ValueError, match="pack_steps"):
    LearnerConfig(pack_steps=-1)


def test_reference_is_a_compute_dtype_copy_and_absent_without_a_penalty(setup):
  learner = _learner(setup, _parity_reward)
  params = nnx.to_pure_dict(learner.params)
  reference = rl_step._reference(learner.params, jnp.bfloat16)
  for ref, param in zip(jax.tree.leaves(nnx.to_pure_dict(reference)), jax.tree.leaves(params)):
    assert ref.dtype == jnp.bfloat16 and ref.sharding == param.sharding
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(param.astype(jnp.bfloat16)))
  assert _learner(setup, _parity_reward, kl=kl_lib.KLPenalty(coef=0.0)).ref_params is None


def test_offloaded_reference_waits_in_host_memory_and_scores_the_same(setup):
  kept = _learner(setup, _parity_reward)
  offloaded = _learner(setup, _parity_reward, offload_reference=True)
  for ref, want in zip(jax.tree.leaves(offloaded.ref_params), jax.tree.leaves(kept.ref_params)):
    assert ref.sharding.memory_kind == "pinned_host" and want.sharding.memory_kind == "device"
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(want))
  on_device = offloaded.reference()
  assert {x.sharding.memory_kind for x in jax.tree.leaves(on_device)} == {"device"}
  seqs, grid = grouped_rows(setup[0], setup[1], g=G), rl_step._single_grid(setup[1].image_grid_thw)
  np.testing.assert_array_equal(offloaded.log_probs(on_device, seqs, grid),
                                kept.log_probs(kept.ref_params, seqs, grid))
  got, want = (learner.step(setup[1], jax.random.key(1)) for learner in (offloaded, kept))
  untimed = lambda metrics: {k: v for k, v in metrics.items() if not k.startswith("time/")}
  assert untimed(got.metrics) == untimed(want.metrics)
  assert {x.sharding.memory_kind for x in jax.tree.leaves(offloaded.ref_params)} == {"pinned_host"}


def _schulman(estimator: str, d: np.ndarray) -> np.ndarray:
  """Schulman's KL estimators by hand, d = ref_logp − logp (k3 with EasyR1's clamps)."""
  if estimator == "k1":
    return -d
  if estimator == "k2":
    return 0.5 * d**2
  d = np.clip(d, -20.0, 20.0)
  return np.clip(np.exp(d) - d - 1.0, -10.0, 10.0)


@pytest.mark.parametrize("placement", ["loss", "reward"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_each_kl_estimator_in_each_placement_through_the_learner_step(setup, monkeypatch,
                                                                      estimator, placement):
  _, batch, mesh = setup
  beta = 0.5
  term = kl_lib.KLPenalty(coef=beta, estimator=estimator, placement=placement)
  terms = ({"kl": term, "kl_reward": kl_lib.KLPenalty(coef=0.0, placement="reward")}
           if placement == "loss" else {"kl": kl_lib.KLPenalty(coef=0.0), "kl_reward": term})
  learner = _learner(setup, _parity_reward, **terms)
  # A reference unlike the policy (another initialisation), so that the KL is far from 0.
  other = init_model(config_lib.tiny(), seed=1, mesh=mesh)
  learner.ref_params = rl_step._reference(nnx.state(other, nnx.Param), other.dtype)
  policy = jax.tree.map(jnp.copy, learner.params)
  scored = {}
  score = learner._score

  def keep_rows(*args):
    out = score(*args)
    scored["rows"] = out[0]
    return out

  monkeypatch.setattr(learner, "_score", keep_rows)
  result = learner.step(batch, jax.random.key(1))
  rows = scored["rows"]
  logp = np.asarray(learner.log_probs(policy, rows.seqs, rl_step._single_grid(
      batch.image_grid_thw)))
  mask = np.asarray(rows.seqs.completion_mask).astype(bool)
  per_token = np.where(mask, _schulman(estimator, np.asarray(rows.ref_logp) - logp), 0.0)
  assert per_token[mask].std() > 1e-2, "the reference should differ from the policy"
  scores = result.scores.astype(np.float64)
  if placement == "loss":  # token_mean of the per-token KL, scaled by β into the loss
    np.testing.assert_allclose(result.metrics["update/kl_loss"], per_token.sum() / mask.sum(),
                               rtol=1e-4)
    np.testing.assert_allclose(result.metrics["update/loss"], result.metrics["update/pg_loss"]
                               + beta * result.metrics["update/kl_loss"], rtol=1e-5, atol=1e-6)
  else:  # the outcome estimator sees r − β Σ_t KL; the loss has no KL term
    assert result.metrics["update/kl_loss"] == 0.0
    scores = scores - beta * per_token.sum(axis=1)
  groups = scores.reshape(PROMPTS, G)
  centred = groups - groups.mean(1, keepdims=True)
  want = centred / (groups.std(1, ddof=1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(result.advantages[:, 0].reshape(PROMPTS, G), want, rtol=1e-4,
                             atol=1e-4)


_VARIANTS = {
    "gspo": losses.PolicyLossConfig(kind="gspo", clip_low=3e-4, clip_high=4e-4, dual_clip=None,
                                    aggregation="seq_mean_token_mean"),
    "cispo": losses.PolicyLossConfig(kind="cispo", dual_clip=None),
    "tis": losses.PolicyLossConfig(tis_cap=2.0),
    "entropy_bonus": losses.PolicyLossConfig(entropy_coef=0.05),
}


@pytest.mark.parametrize("variant", sorted(_VARIANTS))
def test_each_objective_variant_runs_a_learner_step(setup, variant):
  # μ = 2: the second pass sees ratios off 1 (old log-probs from before the first update).
  learner = _learner(setup, _parity_reward, loss=_VARIANTS[variant], num_updates_per_rollout=2)
  before = np.asarray(learner.params["text"]["layers"]["mlp"]["up"].get_value()).copy()
  result = learner.step(setup[1], jax.random.key(2))
  metrics = result.metrics
  assert np.isfinite(metrics["update/loss"]) and metrics["updates/skipped_non_finite"] == 0
  assert metrics["update/grad_norm"] > 0
  assert not np.allclose(before, np.asarray(learner.model.text.layers.mlp.up.get_value()))
  if variant == "entropy_bonus":  # the loss is pg + β·kl − c·entropy (means over the passes)
    np.testing.assert_allclose(
        metrics["update/loss"], metrics["update/pg_loss"] + 1e-2 * metrics["update/kl_loss"]
        - 0.05 * metrics["update/entropy"], rtol=1e-5)
  if variant == "tis":  # the trainer scores the sampler's tokens as the sampler did: w ≈ 1 < 2
    assert metrics["update/tis_truncated_fraction"] == 0.0
  if variant == "gspo":  # one ratio per sequence: ε = 3e-4 clips whole sequences in pass 2
    assert metrics["update/clip_fraction"] > 0


def test_a_registered_estimator_runs_a_learner_step(setup, monkeypatch):
  monkeypatch.setattr(adv_lib, "ESTIMATORS", dict(adv_lib.ESTIMATORS))

  @adv_lib.register_estimator("sign_of_deviation")
  def sign_of_deviation(scores, response_mask, group_size, kl_penalty=None, *, options=None):
    del kl_penalty, options
    groups = scores.reshape(-1, group_size)
    sign = jnp.sign(groups - groups.mean(axis=1, keepdims=True)).reshape(-1, 1)
    return jnp.where(response_mask.astype(bool), sign, 0.0)

  learner = _learner(setup, _parity_reward, algo="sign_of_deviation")
  result = learner.step(setup[1], jax.random.key(1))
  scores = result.scores.reshape(PROMPTS, G)
  want = np.sign(scores - scores.mean(1, keepdims=True))
  np.testing.assert_array_equal(result.advantages[:, 0].reshape(PROMPTS, G), want)
  assert np.isfinite(result.metrics["update/loss"])


def _one_informative_prompt(texts, answers):
  """Prompt [[A]]'s group always scores 1 (nothing to learn); prompt [[C]]'s alternates 0, 1."""
  del texts
  total = np.array([float(i % 2) if a == "[[C]]" else 1.0 for i, a in enumerate(answers)],
                   np.float32)
  zeros = np.zeros_like(total)
  return rewards.RewardOutput(format=zeros, answer=total, xyz=zeros,
                              open_ended=np.zeros(len(total), bool), total=total)


def test_dynamic_sampling_draws_until_every_group_is_informative(setup, tokenizer):
  _, batch, _ = setup
  rng = np.random.default_rng(1)
  # The next loader batch has a shorter prompt bucket: merged prompts are left-padded to one width.
  shorter = question_batch(image_prompts(tokenizer, [
      (text, rng.integers(0, 255, (56, 84, 3), dtype=np.uint8))
      for text in ("Which way? [[A]] up", "Where next? [[A]] left [[B]] right [[C]] on")],
      length=60, pad_id=tokenizer.pad_token_id), answers=["[[A]]", "[[C]]"],
      question_types=["movement", "waypoint"], tasks=["t", "t"])
  learner = _learner(setup, _one_informative_prompt, batch_filter="informative")
  draws = []
  result = learner.step(batch, jax.random.key(1), draw=lambda: draws.append(1) or shorter)
  metrics = result.metrics
  assert len(draws) == 1 and metrics["dynamic_sampling/draws"] == 2.0
  assert metrics["dynamic_sampling/kept_fraction"] == 0.5
  assert metrics["dynamic_sampling/refused_in_batch"] == 0.0
  # Both prompts trained on are [[C]]'s (one from each draw), with GRPO advantages ±0.866.
  assert [r["answer"] for r in result.rollouts] == ["[[C]]"] * (PROMPTS * G)
  np.testing.assert_array_equal(result.scores, np.tile([0.0, 1.0], PROMPTS * G // 2))
  np.testing.assert_allclose(np.abs(result.advantages[:, 0]), np.sqrt(3) / 2, rtol=1e-5)
  assert np.isfinite(metrics["update/loss"])
  # Without enough draws (the bound, or the data's end) the refused group fills the rollout.
  for draw in (lambda: shorter, None):
    bounded = _learner(setup, _one_informative_prompt, batch_filter="informative", max_draws=1)
    metrics = bounded.step(batch, jax.random.key(1), draw=draw).metrics
    assert metrics["dynamic_sampling/draws"] == 1.0
    assert metrics["dynamic_sampling/refused_in_batch"] == 1.0

  def exhausted():
    raise StopIteration

  metrics = _learner(setup, _one_informative_prompt, batch_filter="informative").step(
      batch, jax.random.key(1), draw=exhausted).metrics
  assert metrics["dynamic_sampling/draws"] == 1.0
  assert metrics["dynamic_sampling/refused_in_batch"] == 1.0


def test_overlong_shaping_and_truncation_masking(setup):
  # A 5-token budget: every completion that does not stop early is cut, and the overlong shaper
  # (buffer 2) takes up to 1 off the scores of completions longer than 3 tokens.
  learner = _learner(setup, _parity_reward, max_new_tokens=5, reward_shapers=("overlong",),
                     shaping=shaping.ShapingOptions(overlong_buffer=2), mask_truncated=True)
  raw = {}

  def keep_raw(texts, answers):
    out = _parity_reward(texts, answers)
    raw["total"] = out.total
    return out

  learner.reward_fn = keep_raw
  result = learner.step(setup[1], jax.random.key(3))
  lengths = result.metrics["response_length/mean"]
  assert lengths > 3, "the test wants completions that reach the buffer"
  mask = result.completion_mask.astype(bool)
  cut = mask.sum(1) == 0  # truncated rows carry no loss
  assert cut.any() and result.metrics["tokens/trained"] == mask.sum()
  assert result.metrics["tokens/trained"] < result.metrics["tokens/generated"]
  # Truncated rows used the whole budget: their score lost the full penalty (5 − 3) / 2 = 1.
  np.testing.assert_allclose(result.scores[cut], raw["total"][cut] - 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="overlong_buffer <= max_new_tokens"):
    LearnerConfig(reward_shapers=("overlong",), max_new_tokens=8,
                  shaping=shaping.ShapingOptions(overlong_buffer=9))
  with pytest.raises(ValueError, match="unknown batch filter 'all'"):
    LearnerConfig(batch_filter="all")


def test_without_a_reference_no_kl_is_reported(setup):
  """With β = 0 there is no reference model: its log-probs are placeholder zeros, and a KL against
  them (0.29 at step 1 of a DAPO run, where policy and start are one) must not be logged."""
  learner = _learner(setup, _parity_reward, kl=kl_lib.KLPenalty(coef=0.0))
  assert learner.ref_params is None
  metrics = learner.step(setup[1], jax.random.key(0)).metrics
  assert "kl/policy_ref" not in metrics and metrics["update/kl_loss"] == 0.0
