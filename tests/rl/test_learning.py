"""End to end on a toy problem: each estimator must take a tabular policy from chance to ≥ 0.9.

Four prompts, each with its own right option. A completion is two tokens: the first decides the
format (tokens 0–1 write a think block, 2–3 do not), the second the option A–D. The completions
are rendered as text and scored by `rewards.compute_rewards` (format + answer, as in the paper), so
the test runs the whole chain: sampling → rewards → advantages → clipped loss → optax update. A sign
or scale error in any estimator leaves the policy at chance or drives it away.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from robot_r1_jax.rl import advantages, losses, rewards
from robot_r1_jax.train import update
from robot_r1_jax.train.scoring import token_log_probs

RIGHT = "CADB"  # the right option of each prompt
PROMPTS, SAMPLES, LENGTH, VOCAB = len(RIGHT), 5, 2, 4  # B, G, T, V
STEPS, UPDATES_PER_ROLLOUT, LEARNING_RATE = 25, 2, 0.1
CONFIG = losses.PolicyLossConfig()  # no KL term


def _render(tokens: np.ndarray) -> str:
  option = "ABCD"[tokens[1]]
  think = "<think>the gripper is above the cup</think>" if tokens[0] < 2 else ""
  return f"{think}<answer>[[{option}]]</answer>"


def expected_reward(table: jax.Array) -> float:
  """E[(r_format + r_answer) / 2] under the policy, exactly: P(format) / 2 + P(right) / 2."""
  probs = np.asarray(jax.nn.softmax(table, axis=-1))  # [B, T, V]
  p_format = probs[:, 0, :2].sum(axis=-1)
  p_right = probs[np.arange(PROMPTS), 1, ["ABCD".index(c) for c in RIGHT]]
  return float((p_format + p_right).mean() / 2)


@jax.jit
def _sample(table: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """G completions per prompt, contiguous per prompt: tokens [B·G, T] and their log-probs."""
  logits = jnp.repeat(table, SAMPLES, axis=0)  # [B·G, T, V]
  tokens = jax.random.categorical(key, logits)
  return tokens, token_log_probs(logits, tokens)


@functools.partial(jax.jit, static_argnames="estimator")
def _update(table, opt_state, tokens, old_logp, scores, *, estimator: str):
  mask = jnp.ones(tokens.shape, bool)
  advs = advantages.ESTIMATORS[estimator](scores, mask, SAMPLES)
  optimizer = optax.adam(LEARNING_RATE)

  def loss_sum(t, rows):
    logp = token_log_probs(jnp.repeat(t, SAMPLES, axis=0), rows["tokens"])
    out = losses.policy_loss(logp, rows["old_logp"], rows["advantages"], mask, CONFIG)
    return out.loss_sum, out

  # The whole rollout as one micro-batch of the trainer's own update.
  rows = jax.tree.map(lambda x: x[None], dict(tokens=tokens, old_logp=old_logp, advantages=advs))
  for _ in range(UPDATES_PER_ROLLOUT):  # μ-updates on one rollout: the ratio leaves 1.
    table, opt_state, *_ = update.accumulate_and_apply(optimizer, table, opt_state, rows,
                                                       loss_sum, losses.finalize)
  return table, opt_state


@pytest.mark.parametrize("estimator", sorted(advantages.ESTIMATORS))
def test_estimator_learns_the_toy_task_from_chance(estimator):
  table = jnp.zeros((PROMPTS, LENGTH, VOCAB))
  # Uniform policy: P(format) = 1/2, P(right) = 1/4 → (1/2 + 1/4) / 2 = 0.375.
  assert expected_reward(table) == pytest.approx(0.375)
  opt_state = optax.adam(LEARNING_RATE).init(table)
  answers = [c for c in RIGHT for _ in range(SAMPLES)]
  key = jax.random.key(0)
  for _ in range(STEPS):
    key, sample_key = jax.random.split(key)
    tokens, old_logp = _sample(table, sample_key)
    scores = rewards.compute_rewards([_render(t) for t in np.asarray(tokens)], answers).total
    table, opt_state = _update(table, opt_state, tokens, old_logp, jnp.asarray(scores),
                               estimator=estimator)
  assert expected_reward(table) >= 0.9
