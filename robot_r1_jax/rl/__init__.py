"""RL core: rule-based rewards, advantage estimators, KL estimators and the clipped policy loss.

    scores = compute_rewards(texts, answers).total
    adv = ESTIMATORS["grpo"](scores, response_mask, group_size)
    out = policy_loss(logp, old_logp, adv, response_mask, config, ...)  # per micro-batch
    loss = finalize(out)  # after `LossOutput.merge` over the micro-batches

`make_sharded_loss` wraps the loss and its gradient in one jitted step sharded over a device mesh.
"""

from robot_r1_jax.rl.advantages import ESTIMATORS, AdvantageOptions, get_estimator
from robot_r1_jax.rl.losses import (AGGREGATIONS, KL_ESTIMATORS, LossOutput, PolicyLossConfig,
                                    finalize, finalize_grads, kl_divergence, loss_metrics,
                                    policy_loss, token_entropy, token_log_probs)
from robot_r1_jax.rl.rewards import (RewardOutput, RewardWeights, answer_reward, compute_rewards,
                                     format_reward, xyz_reward)
from robot_r1_jax.rl.sharded_loss import (LossAndGrad, LossBatch, loss_from_logits,
                                          make_sharded_loss, shard_batch)

__all__ = [
    "AGGREGATIONS",
    "AdvantageOptions",
    "ESTIMATORS",
    "KL_ESTIMATORS",
    "LossAndGrad",
    "LossBatch",
    "LossOutput",
    "PolicyLossConfig",
    "RewardOutput",
    "RewardWeights",
    "answer_reward",
    "compute_rewards",
    "finalize",
    "finalize_grads",
    "format_reward",
    "get_estimator",
    "kl_divergence",
    "loss_from_logits",
    "loss_metrics",
    "make_sharded_loss",
    "policy_loss",
    "shard_batch",
    "token_entropy",
    "token_log_probs",
    "xyz_reward",
]
