"""Training infrastructure: checkpoints, preemption handling and metrics.

    ckpt = Checkpointer(workdir / "checkpoints")      # orbax; save/restore on every process
    state, meta = ckpt.restore(abstract_state=abstract, data_iterator=it)
    with PreemptionGuard() as guard: ...              # SIGTERM -> guard.requested
    writer = MetricsWriter(workdir)                   # tb/, metrics.jsonl, rollouts.jsonl
    bar, timer = ProgressBar(total_steps), StepTimer()
"""

from robot_r1_jax.train.checkpoint import CheckpointError, Checkpointer, PreemptionGuard, Restored
from robot_r1_jax.train.metrics import MetricsWriter, ProgressBar, StepTimer

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "MetricsWriter",
    "PreemptionGuard",
    "ProgressBar",
    "Restored",
    "StepTimer",
]
