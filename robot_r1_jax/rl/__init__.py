"""RL maths as pure functions: rule-based rewards, advantage estimators, the KL penalty, policy
objectives, reward shapers and batch filters. Nothing here knows about models, training machinery
or stages. Estimators, objectives, shapers and filters are registries a user's module extends
(`register_estimator`, `register_policy_loss`, `register_reward_shaper`, `register_batch_filter`).

    scores = compute_rewards(texts, answers).total                     # [B·G]
    kl = KLPenalty(coef=1e-2, estimator="k3", placement="loss")
    adv = ESTIMATORS["grpo"](scores, response_mask, group_size)         # [B·G, R]
    out = policy_loss(logp, old_logp, adv, response_mask, config,       # per micro-batch
                      ref_logp=ref_logp, kl=kl)
    loss = finalize(out)  # after `LossOutput.merge` over the micro-batches
"""

from robot_r1_jax.rl.advantages import (ESTIMATORS, AdvantageOptions, get_estimator,
                                        register_estimator)
from robot_r1_jax.rl.kl import KL_ESTIMATORS, KLPenalty, kl_divergence
from robot_r1_jax.rl.losses import (AGGREGATIONS, POLICY_LOSSES, LossOutput, PolicyLossConfig,
                                    TokenTerms, finalize, loss_metrics, policy_loss,
                                    register_policy_loss)
from robot_r1_jax.rl.rewards import (RewardOutput, RewardWeights, answer_reward, bins_reward,
                                     compute_rewards, format_reward, xyz_reward)
from robot_r1_jax.rl.shaping import (BATCH_FILTERS, REWARD_SHAPERS, ShapingOptions,
                                     register_batch_filter, register_reward_shaper)

__all__ = [
    "AGGREGATIONS",
    "AdvantageOptions",
    "BATCH_FILTERS",
    "ESTIMATORS",
    "KLPenalty",
    "KL_ESTIMATORS",
    "LossOutput",
    "POLICY_LOSSES",
    "PolicyLossConfig",
    "REWARD_SHAPERS",
    "RewardOutput",
    "RewardWeights",
    "ShapingOptions",
    "TokenTerms",
    "answer_reward",
    "bins_reward",
    "compute_rewards",
    "finalize",
    "format_reward",
    "get_estimator",
    "kl_divergence",
    "loss_metrics",
    "policy_loss",
    "register_batch_filter",
    "register_estimator",
    "register_policy_loss",
    "register_reward_shaper",
    "xyz_reward",
]
