"""The stages of a run, each a loop over the train machinery: SFT, RL, and greedy evaluation.

    context = StageContext(model, tokenizer, mesh, data_dir, LoaderConfig(...))
    train_sft(context, SftConfig(total_steps=60), workdir / "sft")
    evaluator = split_evaluator(context, EvalConfig(max_new_tokens=256))
    train_rl(context, RLConfig(step=LearnerConfig(algo="grpo")), workdir / "rl",
             evaluate=evaluator)
"""

from robot_r1_jax.stages.context import StageContext
# Not `evaluate.evaluate`: the name would hide the `stages.evaluate` module.
from robot_r1_jax.stages.evaluate import (EvalConfig, EvalResult, compare_table, evaluate_split,
                                          split_evaluator)
from robot_r1_jax.stages.rl import RLConfig, train_rl
from robot_r1_jax.stages.rl_step import Learner, LearnerConfig
from robot_r1_jax.stages.sft import SftConfig, run_sft, train_sft
from robot_r1_jax.stages.sft_step import SftTrainer

__all__ = [
    "EvalConfig", "EvalResult", "Learner", "LearnerConfig", "RLConfig", "SftConfig", "SftTrainer",
    "StageContext", "compare_table", "evaluate_split", "run_sft", "split_evaluator",
    "train_rl", "train_sft",
]
