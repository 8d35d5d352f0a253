"""The optimizer every stage trains with: AdamW after global-norm clipping, with a schedule."""

from __future__ import annotations

import dataclasses
import math

import optax

SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with a linear warm-up, then a constant, cosine or linear decay to 0."""

  learning_rate: float = 1e-6
  schedule: str = "constant"
  warmup_steps: int = 0
  weight_decay: float = 1e-2
  grad_clip: float = 1.0

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"OptimizerConfig.schedule={self.schedule!r} is not one of "
                       f"{list(SCHEDULES)}")
    for name in ("learning_rate", "weight_decay", "grad_clip"):
      value = getattr(self, name)
      if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"OptimizerConfig.{name}={value} must be finite and >= 0")
    if self.warmup_steps < 0:
      raise ValueError(f"OptimizerConfig.warmup_steps={self.warmup_steps} must be >= 0")


def build_optimizer(config: OptimizerConfig, total_steps: int
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(the optimizer, its learning-rate schedule over `total_steps` updates).

  Every stage's optimizer state has one structure whatever the schedule (clipping, then AdamW),
  so a checkpoint of any stage restores into any other's.
  """
  lr, warmup = config.learning_rate, config.warmup_steps
  decay_steps = max(total_steps - warmup, 1)
  after = {"constant": optax.constant_schedule(lr),
           "cosine": optax.cosine_decay_schedule(lr, decay_steps),
           "linear": optax.linear_schedule(lr, 0.0, decay_steps)}[config.schedule]
  schedule = (optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])
              if warmup else after)
  return optax.chain(optax.clip_by_global_norm(config.grad_clip),
                     optax.adamw(schedule, weight_decay=config.weight_decay)), schedule
