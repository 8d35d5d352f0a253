"""Training machinery that knows no stage: the optimizer, scoring (log-probs of completions), the
one jitted donated update, the loop, checkpoints and metrics.

    optimizer, schedule = build_optimizer(OptimizerConfig(learning_rate=1e-6), total_steps)
    logp, entropy = sequence_log_probs(model, seqs, image_grid, temperature, share)
    params, opt_state, sums, grad_norm, finite = update.accumulate_and_apply(...)
    history = loop.run(trainer, step_fn, data, LoopConfig(workdir, total_steps))
    ckpt = Checkpointer(workdir / "checkpoints")      # orbax; save/restore on every process
    writer = MetricsWriter(workdir)                   # tb/, metrics.jsonl, rollouts.jsonl
"""

from robot_r1_jax.train.checkpoint import (CheckpointError, Checkpointer, PreemptionGuard,
                                           Restored, restore_params)
from robot_r1_jax.train.loop import (LoopConfig, LoopSettings, StepResult, TrainingStopped,
                                     total_steps)
from robot_r1_jax.train.metrics import MetricsWriter, ProgressBar, StepTimer
from robot_r1_jax.train.optim import OptimizerConfig, build_optimizer
from robot_r1_jax.train.scoring import (Sequences, sequence_log_probs, token_entropy,
                                        token_log_probs)

__all__ = [
    "CheckpointError", "Checkpointer", "LoopConfig", "LoopSettings", "MetricsWriter",
    "OptimizerConfig", "PreemptionGuard", "ProgressBar", "Restored", "Sequences", "StepResult",
    "StepTimer", "TrainingStopped", "build_optimizer", "restore_params", "sequence_log_probs",
    "token_entropy", "token_log_probs", "total_steps",
]
