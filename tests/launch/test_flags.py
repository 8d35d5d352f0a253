"""The packaged flagfiles parse into the run's typed configs, the RL flags mean what their help
says, and --help documents the training flags."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
from absl import flags
from absl.testing import flagsaver

from robot_r1_jax.launch import flagfiles
from robot_r1_jax.launch import flags as F
from robot_r1_jax.launch.config import RunConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "robot_r1_jax" / "launch" / "configs").rglob("*.cfg"))


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
    flags.FLAGS(flagfiles.expand(["launch", *args]))
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


def _assert_paper_recipe(config: RunConfig, *, algo: str = "grpo") -> None:
  """Robot-R1's numbers (arXiv 2506.00070, run with EasyR1): see DESIGN.md's RL facts."""
  rl, step = config.rl, config.rl.step
  assert (rl.rollout_batch_size, step.train_batch_size, step.num_generations) == (512, 128, 5)
  assert rl.updates_per_step == 4 and step.num_updates_per_rollout == 1
  assert step.micro_batch_size % step.num_generations == 0  # each prompt scored once
  assert step.prompt_share == step.num_generations
  assert step.algo == algo
  opt = rl.optimizer
  assert (opt.learning_rate, opt.schedule, opt.warmup_steps) == (1e-6, "constant", 0)
  assert (opt.weight_decay, opt.grad_clip) == (1e-2, 1.0)
  loss = step.loss
  assert (loss.clip_low, loss.clip_high, loss.dual_clip, loss.aggregation) == (
      0.2, 0.3, 3.0, "token_mean")
  sampling = rl.sampling
  assert (sampling.temperature, sampling.top_p, sampling.top_k) == (1.0, 0.99, 0)
  assert (rl.epochs, rl.max_steps) == (5, 0)
  assert step.max_new_tokens == 1024 and config.data.image_size == 224


def test_paper_recipe_holds_the_papers_numbers_and_starts_rl_from_the_given_model():
  config = run_config("--flagfile=robot_r1_paper.cfg")
  _assert_paper_recipe(config)
  assert config.stage == "rl" and config.runs_rl and not config.runs_sft
  assert config.init_from is None  # The given model is the policy and the reference at step 1.
  kl = config.rl.step.kl
  assert (kl.coef, kl.estimator, kl.placement) == (1e-2, "k3", "loss")
  assert not config.rl.step.kl_reward.active
  assert config.rl.step.offload_reference  # what lets the update fit a 16-chip v5e
  # The same file named by its path from the repository root (as the README shows).
  assert run_config(f"--flagfile={flagfiles.CONFIGS / 'robot_r1_paper.cfg'}") == config


@pytest.mark.parametrize("algo", ["grpo", "rloo", "reinforce_pp"])
def test_ablation_recipes_change_only_the_algorithm(algo):
  config = run_config(f"--flagfile=ablations/{algo}.cfg")
  _assert_paper_recipe(config, algo=algo)
  assert config.stage == "rl"
  kl, reward_kl = config.rl.step.kl, config.rl.step.kl_reward
  if algo == "reinforce_pp":  # REINFORCE++'s own KL: k1, β 1e-3, in the token rewards
    assert not kl.active and (reward_kl.coef, reward_kl.estimator) == (1e-3, "k1")
  else:
    assert (kl.coef, kl.estimator) == (1e-2, "k3") and not reward_kl.active
  # Only the algorithm (and REINFORCE++'s KL) differs from the paper recipe.
  paper = run_config("--flagfile=robot_r1_paper.cfg")
  differ = {k for k, v in config.flags.items() if paper.flags[k] != v}
  assert differ <= {"algo", "kl_in_reward", "kl_coef", "kl_estimator"}


def test_two_stage_recipe_runs_sft_then_the_paper_rl():
  config = run_config("--flagfile=sft_then_rl.cfg")
  _assert_paper_recipe(config)
  assert config.stage == "sft_rl" and config.runs_sft and config.runs_rl
  assert config.sft.targets.kind == "cot" and config.sft.optimizer.learning_rate == 1e-5
  assert config.sft.batch_size % config.sft.micro_batch_size == 0


def test_the_command_line_overrides_a_recipe():
  config = run_config("--flagfile=ablations/rloo.cfg", "--learning_rate=3e-6", "--model=tiny")
  assert config.rl.optimizer.learning_rate == 3e-6 and config.rl.step.algo == "rloo"


def test_bad_flagfiles_fail_naming_the_file_and_line(tmp_path):
  (tmp_path / "typo.cfg").write_text("# a comment\n--flagfile=robot_r1_paper.cfg\n\n"
                                     "--learnin_rate=1e-5\n")
  with pytest.raises(flagfiles.FlagfileError, match=r"typo.cfg:4: unknown flag --learnin_rate "
                     r"\(did you mean --learning_rate\?\)"):
    run_config(f"--flagfile={tmp_path / 'typo.cfg'}")
  (tmp_path / "missing.cfg").write_text("--flagfile=nowhere/base.cfg\n")
  with pytest.raises(flagfiles.FlagfileError, match=r"flagfile nowhere/base.cfg \(named in "
                     r".*missing.cfg:1\) not found"):
    run_config(f"--flagfile={tmp_path / 'missing.cfg'}")
  (tmp_path / "a.cfg").write_text("--flagfile=b.cfg\n")
  (tmp_path / "b.cfg").write_text("--algo=rloo\n--flagfile=a.cfg\n")
  with pytest.raises(flagfiles.FlagfileError, match="a.cfg includes itself: .*a.cfg → .*b.cfg → "
                     ".*a.cfg"):
    run_config(f"--flagfile={tmp_path / 'a.cfg'}")
  (tmp_path / "prose.cfg").write_text("algo=rloo\n")
  with pytest.raises(flagfiles.FlagfileError, match="prose.cfg:1: 'algo=rloo' is not a flag"):
    run_config(f"--flagfile={tmp_path / 'prose.cfg'}")
  with pytest.raises(flagfiles.FlagfileError, match="flagfile absent.cfg .*the command line"):
    run_config("--flagfile", "absent.cfg")
  # Booleans in their --no form are known flags.
  (tmp_path / "ok.cfg").write_text("--noremat\n--kl_in_reward\n")
  assert run_config(f"--flagfile={tmp_path / 'ok.cfg'}").rl.step.kl_reward.active


def test_launcher_reports_a_bad_flagfile_without_a_traceback(tmp_path):
  (tmp_path / "typo.cfg").write_text("--algo=rloo\n--num_generation=4\n")
  proc = subprocess.run([sys.executable, "-m", "robot_r1_jax.launch",
                         f"--flagfile={tmp_path / 'typo.cfg'}"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert "typo.cfg:2: unknown flag --num_generation (did you mean --num_generations?)" in (
      proc.stderr)
  assert "Traceback" not in proc.stderr


def test_objective_flags():
  loss = run_config("--policy_loss=gspo", "--dual_clip=0", "--loss_aggregation=seq_mean_token_mean",
                    "--clip_low=3e-4", "--clip_high=4e-4").rl.step.loss
  assert (loss.kind, loss.dual_clip, loss.clip_low, loss.clip_high) == ("gspo", None, 3e-4, 4e-4)
  loss = run_config("--tis_cap=2", "--entropy_coef=1e-3").rl.step.loss
  assert (loss.kind, loss.tis_cap, loss.entropy_coef) == ("ppo_clip", 2.0, 1e-3)
  assert run_config().rl.step.loss.tis_cap is None
  with pytest.raises(ValueError, match="kind='cispo' does not combine with dual_clip=3.0"):
    run_config("--policy_loss=cispo")
  with pytest.raises(ValueError, match="kind='ppo' is not one of .*'cispo', 'gspo', 'ppo_clip'"):
    run_config("--policy_loss=ppo")
  with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
    run_config("--algo=ppo")


_USER_MODULE = '''
"""A user's algorithm: the sign of each sample's deviation from its group mean."""
import jax.numpy as jnp
from robot_r1_jax import rl


@rl.register_estimator("{name}")
def sign_of_deviation(scores, response_mask, group_size, kl_penalty=None, *, options=None):
  groups = scores.reshape(-1, group_size)
  sign = jnp.sign(groups - groups.mean(axis=1, keepdims=True)).reshape(-1, 1)
  return jnp.where(response_mask.astype(bool), sign, 0.0)
'''


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
  """A folder on sys.path for modules written by the test; registries and sys.modules restored."""
  from robot_r1_jax.rl import advantages, losses

  monkeypatch.setattr(advantages, "ESTIMATORS", dict(advantages.ESTIMATORS))
  monkeypatch.setattr(losses, "POLICY_LOSSES", dict(losses.POLICY_LOSSES))
  monkeypatch.syspath_prepend(str(tmp_path))
  names = []

  def write(name: str, text: str) -> str:
    (tmp_path / f"{name}.py").write_text(text)
    names.append(name)
    return name

  yield write
  for name in names:
    sys.modules.pop(name, None)


def test_import_adds_a_user_estimator(user_modules):
  module = user_modules("user_algo_ok", _USER_MODULE.format(name="sign_of_deviation"))
  config = run_config(f"--import={module}", "--algo=sign_of_deviation")
  assert config.rl.step.algo == "sign_of_deviation"


def test_import_errors_name_the_module(user_modules):
  with pytest.raises(ValueError, match="--import=no_such_module_here: no module named "
                     "'no_such_module_here' on the Python path"):
    run_config("--import=no_such_module_here")
  quiet = user_modules("user_algo_quiet", "X = 1\n")
  with pytest.raises(ValueError, match=f"--import={quiet} registered nothing"):
    run_config(f"--import={quiet}")
  broken = user_modules("user_algo_broken", "import not_installed_dependency_xyz\n")
  with pytest.raises(ValueError, match=f"--import={broken}: the module failed to import: No "
                     "module named 'not_installed_dependency_xyz'"):
    run_config(f"--import={broken}")
  clash = user_modules("user_algo_clash", _USER_MODULE.format(name="grpo"))
  with pytest.raises(ValueError, match=f"--import={clash}: the module failed to import: "
                     "ValueError: an advantage estimator named 'grpo' is already registered"):
    run_config(f"--import={clash}")


@pytest.mark.parametrize("objective,loss", [
    ("gspo", ("gspo", 3e-4, 4e-4, None, "seq_mean_token_mean")),
    ("cispo", ("cispo", 0.2, 0.3, None, "token_mean")),
])
def test_objective_recipes_change_only_the_objective(objective, loss):
  config = run_config(f"--flagfile=ablations/{objective}.cfg")
  got = config.rl.step.loss
  assert (got.kind, got.clip_low, got.clip_high, got.dual_clip, got.aggregation) == loss
  paper = run_config("--flagfile=robot_r1_paper.cfg")
  differ = {k for k, v in config.flags.items() if paper.flags[k] != v}
  assert differ <= {"policy_loss", "clip_low", "clip_high", "dual_clip", "loss_aggregation"}
  assert config.rl.optimizer == paper.rl.optimizer and config.rl.sampling == paper.rl.sampling


def test_dapo_recipe_and_flags():
  config = run_config("--flagfile=ablations/dapo.cfg")
  step = config.rl.step
  assert (step.loss.clip_low, step.loss.clip_high, step.loss.aggregation) == (
      0.2, 0.28, "token_mean")
  assert (step.batch_filter, step.max_draws, step.reward_shapers) == ("informative", 10,
                                                                     ("overlong",))
  assert (step.shaping.overlong_buffer, step.shaping.overlong_penalty) == (205, 1.0)
  assert not step.needs_reference  # DAPO drops the KL term
  assert step.max_new_tokens == 1024 and config.rl.rollout_batch_size == 512
  step = run_config("--mask_truncated").rl.step
  assert step.mask_truncated and step.batch_filter is None and step.reward_shapers == ()
  with pytest.raises(ValueError, match="'overlong' reward shaper needs 0 < overlong_buffer"):
    run_config("--reward_shapers=overlong")
  with pytest.raises(ValueError, match="unknown batch filter 'all_good'"):
    run_config("--batch_filter=all_good")


def test_cpu_smoke_recipe_is_a_few_tiny_steps():
  config = run_config("--flagfile=cpu_smoke.cfg")
  step = config.rl.step
  assert (config.model.name, config.rl.max_steps, config.data.sim_tasks) == (
      "tiny", 3, ("pick_up_cup", "push_button"))
  assert (step.num_generations, config.rl.rollout_batch_size, step.train_batch_size,
          step.micro_batch_size, step.max_new_tokens) == (2, 2, 1, 2, 16)
  assert config.stage == "sft_rl" and str(config.workdir) == "workdir_smoke"


def test_objective_deltas_set_only_their_own_flags():
  budget = "--max_new_tokens=1024"  # DAPO's overlong buffer (205) needs a budget above it
  defaults = run_config(budget)
  for name, allowed in (("gspo", {"policy_loss", "loss_aggregation", "clip_low", "clip_high",
                                  "dual_clip"}),
                        ("cispo", {"policy_loss", "dual_clip"}),
                        ("dapo", {"clip_low", "clip_high", "loss_aggregation", "batch_filter",
                                  "max_draws", "reward_shapers", "overlong_buffer",
                                  "overlong_penalty", "kl_coef"})):
    config = run_config(budget, f"--flagfile=objectives/{name}.cfg")
    assert {k for k, v in config.flags.items() if defaults.flags[k] != v} <= allowed, name
