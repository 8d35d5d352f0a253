"""The packaged flagfiles parse into the run's typed configs, the RL flags mean what their help
says, and --help documents the training flags."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
from absl import flags
from absl.testing import flagsaver

from robot_r1_jax.launch import flags as F
from robot_r1_jax.launch.config import RunConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "robot_r1_jax" / "launch" / "configs").glob("*.cfg"))


def _help(*args: str) -> str:
  proc = subprocess.run([sys.executable, "-m", "robot_r1_jax.launch", *args, "--helpshort"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  return proc.stdout + proc.stderr


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_flagfile_parses(cfg):
  out = _help(f"--flagfile={cfg}")
  assert "Error" not in out and "ERROR" not in out, out[-2000:]
  assert "--algo" in out


def test_help_lists_training_flags():
  out = _help()
  for flag in ("--mesh", "--algo", "--[no]kl_in_reward", "--kl_reward_coef", "--num_generations",
               "--micro_batch_size", "--sum_norm_divisor", "--dual_clip",
               "--coordinator_address", "--compute_dtype", "--checkpoint_every"):
    assert flag in out, flag
  assert len(CONFIGS) >= 2


def run_config(*args: str) -> RunConfig:
  """The RunConfig of a command line (in this process; every flag is restored afterwards)."""
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["launch", *args])
    return F.run_config()


def test_seq_mean_token_sum_norm_divides_by_the_budget_or_the_flag():
  loss = run_config("--loss_aggregation=seq_mean_token_sum_norm", "--max_new_tokens=48").rl.step.loss
  assert (loss.aggregation, loss.sum_norm_divisor) == ("seq_mean_token_sum_norm", 48.0)
  loss = run_config("--loss_aggregation=seq_mean_token_sum_norm",
                    "--sum_norm_divisor=100").rl.step.loss
  assert loss.sum_norm_divisor == 100.0
  assert run_config().rl.step.loss.sum_norm_divisor is None
  with pytest.raises(ValueError, match="--sum_norm_divisor=5.0 applies to --loss_aggregation="
                     "seq_mean_token_sum_norm only, not token_mean"):
    run_config("--sum_norm_divisor=5")


def test_dual_clip_zero_turns_it_off():
  assert run_config().rl.step.loss.dual_clip == 3.0
  assert run_config("--dual_clip=0").rl.step.loss.dual_clip is None
  with pytest.raises(ValueError, match="dual_clip=0.5 must be > 1"):
    run_config("--dual_clip=0.5")


def test_kl_terms_have_their_own_coefficient_and_estimator():
  step = run_config().rl.step
  assert (step.kl.coef, step.kl.estimator, step.kl.placement) == (1e-2, "k3", "loss")
  assert not step.kl_reward.active and step.needs_reference
  # Both at once (verl: kl_loss_coef/kl_loss_type beside kl_ctrl.kl_coef/kl_penalty).
  step = run_config("--kl_estimator=k2", "--kl_reward_coef=1e-3",
                    "--kl_reward_estimator=k3").rl.step
  assert (step.kl.coef, step.kl.estimator) == (1e-2, "k2")
  assert (step.kl_reward.coef, step.kl_reward.estimator) == (1e-3, "k3")
  assert step.kl_reward.placement == "reward"
  # --kl_in_reward moves the one term (EasyR1's use_kl_loss=false).
  step = run_config("--kl_in_reward", "--kl_coef=1e-3", "--kl_estimator=k1").rl.step
  assert not step.kl.active
  assert (step.kl_reward.coef, step.kl_reward.estimator) == (1e-3, "k1")
  assert not run_config("--kl_coef=0").rl.step.needs_reference
  with pytest.raises(ValueError, match="--kl_in_reward .* does not combine with "
                     "--kl_reward_coef=0.001"):
    run_config("--kl_in_reward", "--kl_reward_coef=1e-3")
