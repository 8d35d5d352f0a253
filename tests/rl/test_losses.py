"""The clipped policy loss: hand-computed cases, padding, stale ratios, micro-batch sums."""

from __future__ import annotations

import dataclasses
import functools
import re
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from robot_r1_jax.rl import losses
from robot_r1_jax.rl.kl import KLPenalty
from robot_r1_jax.train.scoring import token_entropy, token_log_probs


# Policy loss on B = 3 rows, T = 3 (lengths 3, 2, 0); ε_low .2, ε_high .3, dual clip c = 3.
#   row 0: ρ = [1.5, .5, .5], A = [1, 1, −1];  row 1: ρ = [5, 1.1], A = [−1, −2].
# Per-token loss max(−Aρ, −A·clip(ρ, .8, 1.3)), then min(·, −3A) where A < 0:
#   1.5, A=1 → max(−1.5, −1.3) = −1.3 (ε-clipped);   .5, A=1 → max(−.5, −.8) = −.5;
#   .5, A=−1 → max(.5, .8) = .8 (ε-clipped);          5, A=−1 → min(max(5, 1.3), 3) = 3 (dual);
#   1.1, A=−2 → max(2.2, 2.2) = 2.2.
# k1 to the reference: [.2, .4, 0] and [.1, .3]; entropies [1, 2, 3] and [4, 5].
RATIO = np.array([[1.5, 0.5, 0.5], [5.0, 1.1, 1.0], [1.0, 1.0, 1.0]], np.float32)
LOSS_MASK = np.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]], bool)
OLD_LOGP = np.where(LOSS_MASK, -3.0, np.nan).astype(np.float32)  # padding holds garbage
LOGP = (OLD_LOGP + np.log(RATIO)).astype(np.float32)
ADVANTAGES = np.where(LOSS_MASK, [[1.0, 1.0, -1.0], [-1.0, -2.0, 0.0], [0.0, 0.0, 0.0]],
                      np.inf).astype(np.float32)
REF_LOGP = (LOGP - np.array([[0.2, 0.4, 0.0], [0.1, 0.3, 0.0], [0, 0, 0]])).astype(np.float32)
ENTROPY = np.where(LOSS_MASK, [[1.0, 2.0, 3.0], [4.0, 5.0, 0.0], [0, 0, 0]], np.nan)

# (aggregation, pg loss, kl loss, denominator):
#   token_mean: pg (−1.3 − .5 + .8 + 3 + 2.2) / 5 = .84; kl 1.0 / 5 = .2.
#   seq_mean_token_mean: pg (−1/3 + 5.2/2) / 2 = 1.1333333; kl (.6/3 + .4/2) / 2 = .2.
#   seq_mean_token_sum_norm (divisor 4): pg (−1/4 + 5.2/4) / 2 = .525; kl (.6/4 + .4/4) / 2 = .125.
AGGREGATION_CASES = [
    ("token_mean", 0.84, 0.2, 5),
    ("seq_mean_token_mean", 1.1333333, 0.2, 2),
    ("seq_mean_token_sum_norm", 0.525, 0.125, 2),
]


def _hand_case_loss(**config_overrides) -> losses.LossOutput:
  config = losses.PolicyLossConfig(sum_norm_divisor=4.0, **config_overrides)
  return losses.policy_loss(jnp.asarray(LOGP), jnp.asarray(OLD_LOGP), jnp.asarray(ADVANTAGES),
                            jnp.asarray(LOSS_MASK), config, ref_logp=jnp.asarray(REF_LOGP),
                            entropy=jnp.asarray(ENTROPY), kl=KLPenalty(0.5, "k1"))


@pytest.mark.parametrize("aggregation,pg,kl,denominator", AGGREGATION_CASES)
def test_policy_loss_hand_computed(aggregation, pg, kl, denominator):
  out = _hand_case_loss(aggregation=aggregation)
  assert int(out.denominator) == denominator
  metrics = losses.loss_metrics(out)
  np.testing.assert_allclose(metrics["pg_loss"], pg, rtol=1e-6)
  np.testing.assert_allclose(metrics["kl_loss"], kl, rtol=1e-6)
  np.testing.assert_allclose(losses.finalize(out), pg + 0.5 * kl, rtol=1e-6)
  # Token statistics do not depend on the aggregation. Σ(ρ − ln ρ − 1) / 5 = .5752162.
  expected = {"clip_fraction": 0.4, "dual_clip_fraction": 0.2, "ratio_mean": 1.72,
              "ratio_min": 0.5, "ratio_max": 5.0, "approx_kl": 0.5752162, "entropy": 3.0}
  for name, value in expected.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-6, err_msg=name)


def test_without_dual_clip_the_negative_advantage_loss_is_unbounded():
  out = _hand_case_loss(dual_clip=None)
  # The ρ = 5, A = −1 token now costs 5 instead of 3: (−1.3 − .5 + .8 + 5 + 2.2) / 5 = 1.24.
  np.testing.assert_allclose(losses.loss_metrics(out)["pg_loss"], 1.24, rtol=1e-6)
  assert int(out.dual_clip_count) == 0


def test_empty_batch_gives_zero_loss_and_neutral_metrics():
  zeros = jnp.zeros((2, 3))
  out = losses.policy_loss(zeros, zeros, zeros, jnp.zeros((2, 3), bool),
                           losses.PolicyLossConfig())
  metrics = losses.loss_metrics(out)
  assert float(metrics["loss"]) == 0.0
  assert float(metrics["ratio_min"]) == float(metrics["ratio_max"]) == 1.0
  assert all(np.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("kwargs,match", [
    ({"clip_low": 1.0}, "clip_low"),
    ({"clip_high": -0.1}, "clip_high"),
    ({"dual_clip": 1.0}, "dual_clip"),
    ({"aggregation": "sum"}, "aggregation"),
    ({"aggregation": "seq_mean_token_sum_norm"}, "sum_norm_divisor"),
])
def test_bad_config_names_the_field(kwargs, match):
  with pytest.raises(ValueError, match=f"PolicyLossConfig.{match}"):
    losses.PolicyLossConfig(**kwargs)


def test_policy_loss_input_errors():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="ref_logp is required"):
    losses.policy_loss(x, x, x, x, losses.PolicyLossConfig(), kl=KLPenalty(0.1))
  with pytest.raises(ValueError, match="goes to the advantage estimator"):
    losses.policy_loss(x, x, x, x, losses.PolicyLossConfig(), ref_logp=x,
                       kl=KLPenalty(0.1, placement="reward"))
  with pytest.raises(ValueError, match=r"advantages has shape \(2, 2\)"):
    losses.policy_loss(x, x, jnp.zeros((2, 2)), x, losses.PolicyLossConfig())
  out = losses.policy_loss(x, x, x, x, losses.PolicyLossConfig())
  with pytest.raises(ValueError, match="with and without entropy"):
    out.merge(dataclasses.replace(out, entropy_sum=jnp.zeros(())))


# ---------------------------------------------------------------------------------------------
# Padding: garbage in masked positions changes nothing and receives no gradient.

# (loss config, KL term) pairs: every aggregation, every estimator, with and without dual clip.
_CONFIGS = [
    (losses.PolicyLossConfig(), KLPenalty()),
    (losses.PolicyLossConfig(aggregation="seq_mean_token_mean"), KLPenalty(estimator="k1")),
    (losses.PolicyLossConfig(aggregation="seq_mean_token_sum_norm", sum_norm_divisor=5.0,
                             dual_clip=None), KLPenalty(estimator="k2")),
]


@functools.cache
def _loss_and_logp_grad(config: losses.PolicyLossConfig, kl: KLPenalty):

  def loss_sum(logp, old_logp, advantages, mask, ref_logp):
    out = losses.policy_loss(logp, old_logp, advantages, mask, config, ref_logp=ref_logp,
                             entropy=ref_logp, kl=kl)
    return out.loss_sum, out

  return jax.jit(jax.grad(loss_sum, has_aux=True))


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    config=st.sampled_from(_CONFIGS),
    values=st.lists(st.floats(-3, 3, width=32), min_size=4 * 4 * 5, max_size=4 * 4 * 5),
    lengths=st.lists(st.integers(0, 5), min_size=4, max_size=4),
    garbage=st.sampled_from([np.nan, np.inf, -np.inf, 1e30]))
def test_padding_gets_zero_loss_and_zero_gradient(config, values, lengths, garbage):
  logp, old_logp, advantages, ref_logp = np.array(values, np.float32).reshape(4, 4, 5)
  logp, old_logp, ref_logp = logp - 3, old_logp - 3, ref_logp - 3  # log-probs are ≤ 0
  mask = np.arange(5)[None, :] < np.array(lengths)[:, None]
  clean = _loss_and_logp_grad(*config)(logp, old_logp, advantages, mask, ref_logp)
  dirty = _loss_and_logp_grad(*config)(*(np.where(mask, x, garbage).astype(np.float32)
                                        for x in (logp, old_logp, advantages)), mask,
                                      np.where(mask, ref_logp, garbage).astype(np.float32))
  (grad_clean, out_clean), (grad_dirty, out_dirty) = clean, dirty
  for a, b in zip(jax.tree.leaves(out_clean), jax.tree.leaves(out_dirty)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(grad_clean, grad_dirty)
  np.testing.assert_array_equal(np.asarray(grad_dirty)[~mask], 0.0)
  assert np.isfinite(np.asarray(grad_dirty)).all()


# ---------------------------------------------------------------------------------------------
# The toy log-linear policy (see conftest.py): stale ratios, and exact micro-batch accumulation.


@functools.cache
def _grad_fn(config: losses.PolicyLossConfig, kl: KLPenalty):
  """Jitted (weights, rollout fields) -> (d loss_sum / d weights, LossOutput), one per config."""

  def loss_sum(weights, features, targets, old_logp, advantages, mask, ref_logp):
    logits = jnp.einsum("btd,dv->btv", features, weights)  # the conftest's log-linear policy
    logp = token_log_probs(logits, targets)
    out = losses.policy_loss(logp, old_logp, advantages, mask, config, ref_logp=ref_logp,
                             entropy=token_entropy(logits), kl=kl)
    return out.loss_sum, out

  return jax.jit(jax.grad(loss_sum, has_aux=True))


def _grad(rollout, config: losses.PolicyLossConfig, weights: jax.Array,
          rows: slice = slice(None), kl: KLPenalty = KLPenalty()
          ) -> tuple[jax.Array, losses.LossOutput]:
  fields = (rollout.features, rollout.targets, rollout.old_logp, rollout.advantages, rollout.mask,
            rollout.ref_logp)
  return _grad_fn(config, kl)(weights, *(x[rows] for x in fields))


def _mean_grads(grads: jax.Array, out: losses.LossOutput) -> jax.Array:
  """Gradients of `finalize(out)` from the summed gradients of `loss_sum` (what train.update
  applies)."""
  return grads / jnp.maximum(out.denominator, 1).astype(jnp.float32)


def test_second_update_on_the_same_rollout_sees_stale_ratios(toy_rollout):
  config = losses.PolicyLossConfig()
  grads, first = _grad(toy_rollout, config, toy_rollout.weights)
  metrics = losses.loss_metrics(first)
  # The first μ-update is on-policy: every ratio is exactly 1 and nothing is clipped.
  assert float(metrics["ratio_min"]) == float(metrics["ratio_max"]) == 1.0
  assert float(metrics["clip_fraction"]) == 0.0

  optimizer = optax.adam(0.1)
  updates, _ = optimizer.update(_mean_grads(grads, first),
                                optimizer.init(toy_rollout.weights))
  weights = optax.apply_updates(toy_rollout.weights, updates)

  _, second = _grad(toy_rollout, config, weights)
  metrics = losses.loss_metrics(second)
  assert float(metrics["ratio_min"]) < 0.99 and float(metrics["ratio_max"]) > 1.01
  assert float(metrics["approx_kl"]) > 0.0
  fractions = [float(metrics["clip_fraction"])]  # the default ε 0.2 / 0.3
  for low, high in ((0.01, 0.01), (0.999, 100.0)):
    _, out = _grad(toy_rollout, losses.PolicyLossConfig(clip_low=low, clip_high=high), weights)
    fractions.append(float(losses.loss_metrics(out)["clip_fraction"]))
  default, tight, loose = fractions
  assert tight > default > loose == 0.0


@pytest.mark.parametrize("config, kl", _CONFIGS, ids=[c.aggregation for c, _ in _CONFIGS])
def test_four_micro_batches_equal_the_full_batch(toy_rollout, config, kl):
  # Off-policy weights, so clipping, dual clipping and the KL term all take part.
  weights = toy_rollout.weights + 0.3 * jnp.asarray(
      np.random.default_rng(3).normal(size=toy_rollout.weights.shape), jnp.float32)
  grads, full = _grad(toy_rollout, config, weights, kl=kl)
  assert int(full.clip_count) > 0

  merged, summed = None, None
  for start in range(0, 8, 2):  # 4 micro-batches of 2 rows; the last holds the empty row.
    g, out = _grad(toy_rollout, config, weights, slice(start, start + 2), kl)
    merged = out if merged is None else merged.merge(out)
    summed = g if summed is None else summed + g

  assert int(merged.denominator) == int(full.denominator)
  np.testing.assert_allclose(losses.finalize(merged), losses.finalize(full), rtol=0, atol=1e-6)
  np.testing.assert_allclose(_mean_grads(summed, merged), _mean_grads(grads, full), rtol=0,
                             atol=1e-6)
  for name, value in losses.loss_metrics(full).items():
    np.testing.assert_allclose(losses.loss_metrics(merged)[name], value, rtol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------
# The other objectives, importance truncation and the entropy bonus, on the hand case above.

# GSPO: s = exp(mean_t ln ρ) per sequence: row 0 exp((ln 1.5 + 2 ln .5)/3) = .7211248, row 1
# exp((ln 5 + ln 1.1)/2) = 2.3452079; ℓ = max(−A·s, −A·clip(s, .8, 1.3)):
#   row 0: −.7211248, −.7211248, .8 (ε-clipped) → mean −.2140832;  row 1: 2.3452079, 4.6904158.
#   seq_mean_token_mean: (−.2140832 + 3.5178118) / 2 = 1.6518643.
# CISPO: ℓ = −min(ρ, 1.3)·A·log π with log π = −3 + ln ρ:
#   3.3728954, 1.8465736, −1.8465736, −1.8077307, −6.3903176 → token_mean −.9650306.


def _objective_case(**overrides):
  config = losses.PolicyLossConfig(**overrides)
  return losses.policy_loss(jnp.asarray(LOGP), jnp.asarray(OLD_LOGP), jnp.asarray(ADVANTAGES),
                            jnp.asarray(LOSS_MASK), config, entropy=jnp.asarray(ENTROPY))


def test_gspo_clips_one_ratio_per_sequence():
  out = _objective_case(kind="gspo", dual_clip=None, aggregation="seq_mean_token_mean")
  metrics = losses.loss_metrics(out)
  np.testing.assert_allclose(metrics["pg_loss"], 1.6518643, rtol=1e-6)
  assert int(out.clip_count) == 1  # row 0's negative-advantage token only
  np.testing.assert_allclose(metrics["ratio_min"], 0.7211248, rtol=1e-6)
  np.testing.assert_allclose(metrics["ratio_max"], 2.3452079, rtol=1e-6)


def test_gspo_gradient_is_the_sequence_ratio_over_the_length():
  """Unclipped, with one advantage per sequence, ∂L/∂log π_t = −A_i·s_i / (|y_i|·#sequences)."""
  config = losses.PolicyLossConfig(kind="gspo", clip_low=0.9, clip_high=9.0, dual_clip=None,
                                   aggregation="seq_mean_token_mean")
  advantages = jnp.asarray(np.where(LOSS_MASK, [[2.0], [-1.0], [0.0]], 0.0), jnp.float32)
  grad = jax.grad(lambda lp: losses.finalize(losses.policy_loss(
      lp, jnp.asarray(OLD_LOGP), advantages, jnp.asarray(LOSS_MASK), config)))(jnp.asarray(LOGP))
  want = np.where(LOSS_MASK, [[-2.0 * 0.7211248 / 3 / 2], [1.0 * 2.3452079 / 2 / 2], [0.0]], 0.0)
  np.testing.assert_allclose(grad, want, rtol=1e-5)


def test_cispo_truncates_the_weight_and_keeps_every_gradient():
  out = _objective_case(kind="cispo", dual_clip=None)
  np.testing.assert_allclose(losses.loss_metrics(out)["pg_loss"], -0.9650306, rtol=1e-6)
  assert int(out.clip_count) == 2  # ρ = 1.5 and ρ = 5 exceed 1 + ε_high
  config = losses.PolicyLossConfig(kind="cispo", dual_clip=None)
  grad = jax.grad(lambda lp: losses.finalize(losses.policy_loss(
      lp, jnp.asarray(OLD_LOGP), jnp.asarray(ADVANTAGES), jnp.asarray(LOSS_MASK), config)))(
          jnp.asarray(LOGP))
  # −sg(w)·A / 5 on every token, the ρ = 5 token included (PPO-clip gives it no gradient).
  want = np.where(LOSS_MASK, -np.minimum(RATIO, 1.3) * np.nan_to_num(ADVANTAGES, posinf=0) / 5, 0)
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


def test_truncated_importance_sampling_weights_each_token():
  # π_old / π_rollout = [2, 1, .5] and [4, 1], cap 2 → w = [2, 1, .5], [2, 1] on the PPO-clip
  # losses [−1.3, −.5, .8], [3, 2.2]: (−2.6 − .5 + .4 + 6 + 2.2) / 5 = 1.1.
  quotient = np.array([[2.0, 1.0, 0.5], [4.0, 1.0, 1.0], [1.0, 1.0, 1.0]], np.float32)
  rollout = jnp.asarray(np.where(LOSS_MASK, OLD_LOGP - np.log(quotient), np.nan), jnp.float32)
  out = losses.policy_loss(jnp.asarray(LOGP), jnp.asarray(OLD_LOGP), jnp.asarray(ADVANTAGES),
                           jnp.asarray(LOSS_MASK), losses.PolicyLossConfig(tis_cap=2.0),
                           rollout_logp=rollout)
  metrics = losses.loss_metrics(out)
  np.testing.assert_allclose(metrics["pg_loss"], 1.1, rtol=1e-6)
  np.testing.assert_allclose(metrics["tis_truncated_fraction"], 0.2, rtol=1e-6)
  with pytest.raises(ValueError, match="rollout_logp is required"):
    _objective_case(tis_cap=2.0)


def test_entropy_bonus_is_subtracted_and_differentiable():
  # token_mean: .84 (pg) + .5 · .2 (k1) − .1 · 3 (mean entropy) = .64.
  config = losses.PolicyLossConfig(entropy_coef=0.1)
  loss = lambda ent: losses.finalize(losses.policy_loss(
      jnp.asarray(LOGP), jnp.asarray(OLD_LOGP), jnp.asarray(ADVANTAGES), jnp.asarray(LOSS_MASK),
      config, ref_logp=jnp.asarray(REF_LOGP), entropy=ent, kl=KLPenalty(0.5, "k1")))
  np.testing.assert_allclose(loss(jnp.asarray(ENTROPY)), 0.64, rtol=1e-6)
  grad = jax.grad(loss)(jnp.asarray(np.nan_to_num(ENTROPY)))
  np.testing.assert_allclose(grad, np.where(LOSS_MASK, -0.1 / 5, 0.0), rtol=1e-6)
  with pytest.raises(ValueError, match="entropy is required"):
    losses.policy_loss(jnp.asarray(LOGP), jnp.asarray(OLD_LOGP), jnp.asarray(ADVANTAGES),
                       jnp.asarray(LOSS_MASK), config)


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "gspo", "aggregation": "seq_mean_token_mean"},
     "kind='gspo' does not combine with dual_clip=3.0"),
    ({"kind": "gspo", "dual_clip": None}, "kind='gspo' does not combine with aggregation="
     "'token_mean': its objective is defined with seq_mean_token_mean"),
    ({"kind": "cispo"}, "kind='cispo' does not combine with dual_clip=3.0"),
    ({"kind": "trpo"}, "kind='trpo' is not one of"),
    ({"tis_cap": 0.5}, "tis_cap=0.5 must be >= 1"),
    ({"entropy_coef": -1.0}, "entropy_coef=-1.0 must be >= 0"),
])
def test_objectives_that_cannot_combine_say_which(kwargs, match):
  with pytest.raises(ValueError, match=re.escape(f"PolicyLossConfig.{match}")):
    losses.PolicyLossConfig(**kwargs)


def test_a_registered_objective_is_used_by_name(monkeypatch):
  monkeypatch.setattr(losses, "POLICY_LOSSES", dict(losses.POLICY_LOSSES))

  @losses.register_policy_loss("vanilla_pg")
  def vanilla_pg(logp, old_logp, advantages, mask, config):
    del old_logp, config
    return losses.TokenTerms(loss=jnp.where(mask, -advantages * logp, 0.0),
                             ratio=jnp.ones_like(logp), clipped=jnp.zeros_like(mask),
                             dual_clipped=jnp.zeros_like(mask))

  out = _objective_case(kind="vanilla_pg", dual_clip=None)
  # −A·log π: 2.5945349 + 3.6931472 − 3.6931472 − 1.3905621 − 5.8093796, over 5 tokens.
  np.testing.assert_allclose(losses.loss_metrics(out)["pg_loss"], -0.9210814, rtol=1e-6)
  with pytest.raises(ValueError, match="already registered"):
    losses.register_policy_loss("vanilla_pg")(vanilla_pg)
