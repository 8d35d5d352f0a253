"""Command-line flags of `python -m robot_r1_jax.launch` (use `--flagfile` for recipes), and
`run_config()`, which reads every one of them once into the run's typed `RunConfig`."""

from __future__ import annotations

import importlib
import pathlib

from absl import flags
from etils import epath

from robot_r1_jax.data.prompts import ANSWER_FORMATS
from robot_r1_jax.data.sft_targets import TargetConfig
from robot_r1_jax.generate.sampling import SamplingParams
from robot_r1_jax.launch.config import (JUDGES, MODES, POLICIES, STAGES, ClosedLoopSpec, DataSpec,
                                        Distributed, JudgeSpec, ModelSpec, RunConfig)
from robot_r1_jax.model import attention
from robot_r1_jax.model import config as model_config
from robot_r1_jax.rl import advantages, kl, losses, shaping
from robot_r1_jax.stages.evaluate import EvalConfig
from robot_r1_jax.stages.rl import RLConfig
from robot_r1_jax.stages.rl_step import LearnerConfig
from robot_r1_jax.stages.sft import SftConfig
from robot_r1_jax.train.loop import LoopSettings
from robot_r1_jax.train.optim import SCHEDULES, OptimizerConfig

# Where and what.
WORKDIR = flags.DEFINE_string("workdir", "workdir", "Run directory: checkpoints (resumed "
                              "automatically), TensorBoard events, metrics.jsonl, rollouts.jsonl, "
                              "generated data.")
MODEL = flags.DEFINE_string("model", "tiny", f"A preset ({', '.join(sorted(model_config.PRESETS))}"
                            ") initialised at random, or a local Hugging Face Qwen2.5-VL "
                            "directory (config.json + safetensors).")
TOKENIZER = flags.DEFINE_string("tokenizer", None, "Local tokenizer directory. Default: the "
                                "--model directory when it holds one, else the packaged tiny "
                                "tokenizer.")
DATA = flags.DEFINE_string("data", None, "Extracted shards (python -m robot_r1_jax.data.extract). "
                           "Default: simulate demos and extract them into WORKDIR/data once.")
SIM_TASKS = flags.DEFINE_list("sim_tasks", ["pick_up_cup", "push_button"], "Simulator tasks for "
                              "the default data, and those --mode=closed_loop runs.")
SIM_EPISODES = flags.DEFINE_integer("sim_episodes", 3, "Simulated episodes per task for the "
                                    "default data.")
IMAGE_SIZE = flags.DEFINE_integer("image_size", 128, "Rendered and extracted image size (pixels) "
                                  "for the default data; the paper uses 224.")
PROMPT_STYLE = flags.DEFINE_enum("prompt_style", "paper", ["paper", "compact"], "Prompts of the "
                                 "default data: Robot-R1's, or only the task, current state and "
                                 "question (small models trained from scratch on a CPU).")
ANSWER_FORMAT = flags.DEFINE_enum("answer_format", "mcqa", list(ANSWER_FORMATS), "Answers of the "
                                  "default data: mcqa (options [[A]]..[[D]]), xyz (a position "
                                  "[x, y, z]) or action_tokens (its RT-2 bins, 256 per axis, 'i j "
                                  "k'); the open-ended formats ask no movement questions. With "
                                  "--data, the extraction's format holds.")

# Stages.
STAGE = flags.DEFINE_enum("stage", "sft_rl", list(STAGES), "sft_rl: an SFT warm-up "
                          "(WORKDIR/sft) then RL (WORKDIR/rl), evaluated before and after RL; "
                          "sft or rl: that stage alone, in WORKDIR.")
MODE = flags.DEFINE_enum("mode", "train", list(MODES), "eval: greedy evaluation of the "
                         "newest checkpoint in WORKDIR (or --init_from) on the val split; "
                         "closed_loop: its answers drive the simulated arm through --sim_tasks, "
                         "scored by task success (see --closed_loop_policy).")
CLOSED_LOOP_POLICY = flags.DEFINE_list(
    "closed_loop_policy", list(POLICIES), "--mode=closed_loop: the policies run, side by side in "
    "one table: model (greedy answers of the newest checkpoint in WORKDIR, or --init_from), oracle "
    "(the expert's answers) and random (a uniformly random option).")
CLOSED_LOOP_EPISODES = flags.DEFINE_integer(
    "closed_loop_episodes", 5, "--mode=closed_loop: seeded episodes per task of --sim_tasks (from "
    "seeds the simulated training data never uses).")
CLOSED_LOOP_TRAIN_EPISODES = flags.DEFINE_integer(
    "closed_loop_train_episodes", 1, "--stage=sft_rl on the simulated default data (no --data): "
    "closed-loop episodes per task run with the SFT and the RL model, beside the oracle and random "
    "baselines, in the final table (0: off).")
JUDGE = flags.DEFINE_enum("judge", "none", list(JUDGES), "--mode=eval: also score the open-ended "
                          "answers ([x, y, z] or action tokens) 0-3, into WORKDIR/judge.json: rule "
                          "(by L1: 3 within 2 cm, 2 within 5 cm, 1 within 10 cm) or chat (a judge "
                          "model behind an OpenAI-compatible server; $OPENAI_API_KEY is sent if "
                          "set). A reply it cannot use leaves that record unjudged, with why.")
JUDGE_BASE_URL = flags.DEFINE_string("judge_base_url", None, "--judge=chat: the server's base URL, "
                                     "e.g. http://127.0.0.1:8000/v1 (vllm serve).")
JUDGE_MODEL = flags.DEFINE_string("judge_model", None, "--judge=chat: the served judge model.")
JUDGE_TIMEOUT = flags.DEFINE_float("judge_timeout", 30.0, "--judge=chat: seconds to wait for each "
                                   "reply.")
INIT_FROM = flags.DEFINE_string("init_from", None, "A run directory (or its checkpoints/) whose "
                                "newest parameters initialise the model, e.g. an SFT run for RL.")
SFT_STEPS = flags.DEFINE_integer("sft_steps", 60, "SFT steps (sft and sft_rl stages).")
SFT_TARGET = flags.DEFINE_enum("sft_target", "direct", ["direct", "cot", "check"], "SFT targets: "
                               "the answer alone (direct), rule-generated reasoning then the answer "
                               "(cot), or the options checked in order until the right one "
                               "(check: what a small model trained from scratch learns first).")
SFT_BATCH = flags.DEFINE_integer("sft_batch_size", 8, "Questions per SFT step.")
SFT_LEARNING_RATE = flags.DEFINE_float("sft_learning_rate", 3e-3, "SFT peak learning rate.")
EVAL_BATCH = flags.DEFINE_integer("eval_batch_size", 8, "Questions per evaluation batch.")

# Devices.
MESH = flags.DEFINE_string("mesh", "data=1,fsdp=-1,tensor=1", "Device mesh over axes data, fsdp "
                           "and tensor; -1 takes the remaining devices.")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for "
                                  "multi-process runs; without it jax.distributed auto-detects "
                                  "TPU pods and SLURM when --num_processes > 1.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                                  "Activation dtype; parameters stay float32.")
REMAT = flags.DEFINE_bool("remat", False, "Recompute the decoder layers and vision blocks in the "
                          "backward pass (activation memory of one layer, not all).")
ATTENTION = flags.DEFINE_enum("attention", "auto", list(attention.IMPLEMENTATIONS),
                              "Attention implementation: xla (einsum scores and an fp32 softmax, "
                              "Hugging Face's eager numerics), splash (the Pallas TPU kernel: no "
                              "[T, S] scores in memory), splash_interpret (that kernel through "
                              "the Pallas interpreter, any backend; slow), cudnn "
                              "(jax.nn.dot_product_attention's cuDNN flash attention: GPUs, "
                              "bfloat16 compute), dot_product (the same call with its XLA "
                              "implementation, any backend); auto picks splash on TPU and xla "
                              "elsewhere. The decode step is xla in every case.")
COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Compile every executable of the run for "
                                 "--topology on this host and report each one's memory per chip "
                                 "against the chip's HBM (also WORKDIR/compile_report.json); "
                                 "reads no weights or data, trains nothing. Needs libtpu: "
                                 "pip install -c constraints.txt -e '.[tpu]'.")
TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice to compile for with --compile_only, "
                               "e.g. v5e:4x4, v6e:4x4, v5p:2x2x4, v4:2x2x4.")
COMPILE_EXECUTABLES = flags.DEFINE_list("compile_executables", None, "With --compile_only, only "
                                        "these executables (e.g. rl_update,rollout_decode); "
                                        "default: every one the run uses.")
COMPILE_PROMPT_LENGTH = flags.DEFINE_integer("compile_prompt_length", 0, "Prompt bucket for "
                                             "--compile_only (0: the bucket of the run's longest "
                                             "question with its image, by the run's tokenizer).")

# Algorithm.
IMPORTS = flags.DEFINE_list("import", [], "Python modules to import before the run is configured, "
                            "e.g. one that adds an --algo or --policy_loss with "
                            "robot_r1_jax.rl.register_estimator / register_policy_loss (see the "
                            "README). Each must register something.")
ALGO = flags.DEFINE_string("algo", "grpo", "Advantage estimator: grpo (Shao et al. 2024), dr_grpo "
                           "(Liu et al. 2025), rloo (Ahmadian et al. 2024), reinforce_pp and "
                           "reinforce_pp_baseline (Hu 2025), or one an --import registered.")
POLICY_LOSS = flags.DEFINE_string("policy_loss", "ppo_clip", "Policy objective: ppo_clip (the "
                                  "paper's, with --dual_clip), gspo (Zheng et al. 2025: one "
                                  "clipped ratio per sequence; wants --loss_aggregation="
                                  "seq_mean_token_mean, --dual_clip=0 and ε 3e-4/4e-4), cispo "
                                  "(MiniMax-M1: −sg(min(ρ, 1+ε_high))·A·log π; --dual_clip=0), or "
                                  "one an --import registered.")
TIS_CAP = flags.DEFINE_float("tis_cap", 0, "Truncated importance sampling (Yao et al. 2025; verl's "
                             "tis_imp_ratio_cap, 2 there): weight each token's loss by "
                             "min(π_trainer/π_sampler, C) when the sampler's numerics differ from "
                             "the trainer's (e.g. bf16 rollouts). 0: off.")
REWARD_SHAPERS = flags.DEFINE_list("reward_shapers", [], "Reward shapers applied to each "
                                   "completion's score, in order: overlong (DAPO's soft overlong "
                                   "punishment, with --overlong_buffer), or ones an --import "
                                   "registered.")
OVERLONG_BUFFER = flags.DEFINE_integer("overlong_buffer", 0, "DAPO's L_cache (tokens): with "
                                       "--reward_shapers=overlong, completions longer than "
                                       "--max_new_tokens minus this lose up to "
                                       "--overlong_penalty, linearly.")
OVERLONG_PENALTY = flags.DEFINE_float("overlong_penalty", 1.0, "The overlong penalty at the full "
                                      "budget (DAPO: 1).")
BATCH_FILTER = flags.DEFINE_string("batch_filter", "", "Dynamic sampling (DAPO, Yu et al. 2025): "
                                   "keep drawing prompts until the rollout is full of groups this "
                                   "filter keeps: informative (rewards not all equal), or one an "
                                   "--import registered. Empty: every group.")
MAX_DRAWS = flags.DEFINE_integer("max_draws", 10, "Loader batches one step may draw for "
                                 "--batch_filter (DAPO's max_num_gen_batches); when they run out "
                                 "the rollout is filled with refused groups, counted in the "
                                 "metrics.")
MASK_TRUNCATED = flags.DEFINE_bool("mask_truncated", False, "No loss on completions cut by "
                                   "--max_new_tokens (DAPO's overlong filtering).")
ENTROPY_COEF = flags.DEFINE_float("entropy_coef", 0.0, "Entropy bonus: the loss subtracts this "
                                  "times the aggregated token entropy (verl's entropy_coeff). 0: "
                                  "off.")
KL_ESTIMATOR = flags.DEFINE_enum("kl_estimator", "k3", sorted(kl.KL_ESTIMATORS),
                                 "Estimator of the KL term in the loss (verl's kl_loss_type; k3 is "
                                 "EasyR1's low_var_kl, the paper's).")
KL_COEF = flags.DEFINE_float("kl_coef", 1e-2, "β of the KL term in the loss (EasyR1's kl_coef, "
                             "verl's kl_loss_coef; the paper: 1e-2). The reference model is kept "
                             "only while this or --kl_reward_coef is above 0.")
KL_IN_REWARD = flags.DEFINE_bool("kl_in_reward", False, "Move the --kl_coef/--kl_estimator term "
                                 "from the loss into the reward (EasyR1's use_kl_loss=false). For "
                                 "a reward penalty beside the loss term, use --kl_reward_coef.")
KL_REWARD_COEF = flags.DEFINE_float("kl_reward_coef", 0.0, "β of a KL penalty taken from the "
                                    "reward, per token for REINFORCE++ and summed per sequence "
                                    "for the outcome estimators (verl's use_kl_in_reward with "
                                    "kl_ctrl.kl_coef; REINFORCE++ uses 1e-3 with k1). Runs beside "
                                    "the loss term. 0: off.")
OFFLOAD_REFERENCE = flags.DEFINE_bool("offload_reference", False, "Keep the frozen KL reference "
                                      "in host memory between its scoring passes (verl's ref "
                                      "param_offload): it occupies accelerator memory only while "
                                      "the reference log-probs run, for one host-to-device copy "
                                      "per step.")
KL_REWARD_ESTIMATOR = flags.DEFINE_enum("kl_reward_estimator", "k1", sorted(kl.KL_ESTIMATORS),
                                        "Estimator of the --kl_reward_coef penalty (verl's "
                                        "algorithm.kl_penalty).")
NUM_GENERATIONS = flags.DEFINE_integer("num_generations", 5, "Completions per prompt (G).")
ROLLOUT_BATCH = flags.DEFINE_integer("rollout_batch_size", 4, "Prompts per rollout.")
ROLLOUT_CHUNK = flags.DEFINE_integer(
    "rollout_chunk_size", 0, "Prompts per prefill + decode loop of a rollout, one chunk's KV cache "
    "alive at a time (0: the whole rollout at once); the samples are the same either way. "
    "Divides --rollout_batch_size.")
ROLLOUT_COMPACT = flags.DEFINE_integer(
    "rollout_compact_every", 0, "Decode rollouts in segments of this many tokens and drop the "
    "finished rows between them, so short answers stop costing (the same samples; 0: one loop "
    "over every row until the longest ends).")
ROLLOUT_TENSOR = flags.DEFINE_integer(
    "rollout_tensor_parallel", 0, "Rollouts and evaluation decode on a copy of the parameters in "
    "the compute dtype, split over this many devices (tensor parallel) and replicated over the "
    "rest, which split the rows: no weight gather inside the decode loop. 0: as many as the "
    "model's K/V heads, where the devices allow.")
TRAIN_BATCH = flags.DEFINE_integer("train_batch_size", 4, "Prompts per optimizer update.")
MICRO_BATCH = flags.DEFINE_integer("micro_batch_size", 4, "Sequences per forward/backward. In RL, "
                                   "a multiple of --num_generations runs each prompt once for all "
                                   "its samples (gcd(this, G) samples share a prompt pass).")
PACK_STEPS = flags.DEFINE_integer(
    "pack_steps", 4, "RL: the update and the old/reference log-probs run each micro-batch's "
    "completions packed into their real tokens, so short answers cost their own length rather "
    "than the longest's; each completion width then compiles at most this many more shapes. 0: "
    "always padded.")
UPDATES_PER_ROLLOUT = flags.DEFINE_integer("num_updates_per_rollout", 1, "Passes (μ) over each "
                                           "rollout's mini-batches.")
CLIP_LOW = flags.DEFINE_float("clip_low", 0.2, "PPO ε_low.")
CLIP_HIGH = flags.DEFINE_float("clip_high", 0.3, "PPO ε_high.")
DUAL_CLIP = flags.DEFINE_float("dual_clip", 3.0, "Dual-clip c (Ye et al. 2020; EasyR1's "
                               "clip_ratio_dual 3.0): a negative-advantage token's loss is at most "
                               "−c·A. 0 turns it off.")
LOSS_AGG = flags.DEFINE_enum("loss_aggregation", "token_mean", sorted(losses.AGGREGATIONS),
                             "How token losses become the batch loss: token_mean (DAPO, the "
                             "paper), seq_mean_token_mean (the original GRPO), "
                             "seq_mean_token_sum_norm (Dr. GRPO: each sequence's sum over "
                             "--sum_norm_divisor).")
SUM_NORM_DIVISOR = flags.DEFINE_float("sum_norm_divisor", 0, "The constant that divides each "
                                      "sequence's token-loss sum under --loss_aggregation="
                                      "seq_mean_token_sum_norm (Dr. GRPO). 0: --max_new_tokens, "
                                      "the generation budget, as Dr. GRPO and verl use.")

# Optimisation.
LEARNING_RATE = flags.DEFINE_float("learning_rate", 2e-5, "RL peak learning rate (the paper "
                                   "uses 1e-6 on a pretrained 7B model).")
LR_SCHEDULE = flags.DEFINE_enum("lr_schedule", "constant", list(SCHEDULES),
                                "Decay after warm-up.")
WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 0, "Linear warm-up steps.")
WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 1e-2, "AdamW weight decay.")
GRAD_CLIP = flags.DEFINE_float("grad_clip", 1.0, "Global gradient-norm clip.")
EPOCHS = flags.DEFINE_integer("epochs", 5, "Passes over the training questions.")
MAX_STEPS = flags.DEFINE_integer("max_steps", 8, "Stop after this many RL steps (0: run all "
                                 "epochs).")
MAX_BAD_STEPS = flags.DEFINE_integer("max_bad_steps", 3, "Stop after this many consecutive "
                                     "steps with a skipped non-finite update.")

# Generation.
TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
TOP_P = flags.DEFINE_float("top_p", 0.99, "Nucleus sampling mass.")
TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k sampling (0: off).")
MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "Completion budget.")

# Bookkeeping.
SEED = flags.DEFINE_integer("seed", 0, "Seed for initialisation, data order and sampling.")
CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 10, "Steps between checkpoints "
                                        "(and one at the end).")
KEEP_CHECKPOINTS = flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.")
EVAL_EVERY = flags.DEFINE_integer("eval_every", 0, "Steps between evaluations (0: off).")
ROLLOUTS_EVERY = flags.DEFINE_integer("log_rollouts_every", 1, "Steps between rollout dumps to "
                                      "rollouts.jsonl.")


def _kl_terms() -> dict[str, kl.KLPenalty]:
  """LearnerConfig's `kl` (the loss term) and `kl_reward` (the reward penalty) from the flags."""
  if KL_IN_REWARD.value and KL_REWARD_COEF.value:
    raise ValueError("--kl_in_reward moves the --kl_coef term into the reward; it does not "
                     f"combine with --kl_reward_coef={KL_REWARD_COEF.value} (use one or the other)")
  if KL_IN_REWARD.value:
    return {"kl": kl.KLPenalty(coef=0.0, estimator=KL_ESTIMATOR.value),
            "kl_reward": kl.KLPenalty(coef=KL_COEF.value, estimator=KL_ESTIMATOR.value,
                                      placement="reward")}
  return {"kl": kl.KLPenalty(coef=KL_COEF.value, estimator=KL_ESTIMATOR.value),
          "kl_reward": kl.KLPenalty(coef=KL_REWARD_COEF.value,
                                    estimator=KL_REWARD_ESTIMATOR.value, placement="reward")}


def _import_user_modules() -> None:
  """Imports each --import module; each must add an estimator or a policy loss."""
  registries = (advantages.ESTIMATORS, losses.POLICY_LOSSES, shaping.REWARD_SHAPERS,
                shaping.BATCH_FILTERS)
  for name in IMPORTS.value:
    before = sum(len(r) for r in registries)
    try:
      importlib.import_module(name)
    except ModuleNotFoundError as e:
      if e.name not in (name, name.split(".")[0]):  # A module it imports is missing.
        raise ValueError(f"--import={name}: the module failed to import: {e}") from e
      raise ValueError(f"--import={name}: no module named {name!r} on the Python path "
                       "(add its folder to PYTHONPATH)") from e
    except Exception as e:  # The user's code: report it as theirs, naming the flag.
      raise ValueError(f"--import={name}: the module failed to import: "
                       f"{type(e).__name__}: {e}") from e
    if sum(len(r) for r in registries) == before:
      raise ValueError(f"--import={name} registered nothing: call robot_r1_jax.rl."
                       "register_estimator, register_policy_loss, register_reward_shaper or "
                       "register_batch_filter when it is imported")


def _policy_loss() -> losses.PolicyLossConfig:
  sum_norm = LOSS_AGG.value == "seq_mean_token_sum_norm"
  if SUM_NORM_DIVISOR.value and not sum_norm:
    raise ValueError(f"--sum_norm_divisor={SUM_NORM_DIVISOR.value} applies to "
                     f"--loss_aggregation=seq_mean_token_sum_norm only, not {LOSS_AGG.value}")
  return losses.PolicyLossConfig(
      kind=POLICY_LOSS.value, clip_low=CLIP_LOW.value, clip_high=CLIP_HIGH.value,
      dual_clip=DUAL_CLIP.value or None, aggregation=LOSS_AGG.value,
      tis_cap=TIS_CAP.value or None, entropy_coef=ENTROPY_COEF.value,
      sum_norm_divisor=(SUM_NORM_DIVISOR.value or float(MAX_NEW_TOKENS.value)) if sum_norm
      else None)


def run_config() -> RunConfig:
  """The flags, read once, as the run's typed configuration (raises ValueError naming a field
  whose value a config refuses)."""
  _import_user_modules()
  if DATA.value and "://" in DATA.value:  # grain reads ArrayRecord shards from local files only
    raise ValueError(
        f"--data={DATA.value}: the loader reads shards from local disk only; copy the extracted "
        "folder to local disk, or mount the bucket with gcsfuse "
        "(https://cloud.google.com/storage/docs/gcsfuse-mount) and pass the mounted path")
  loop = LoopSettings(checkpoint_every=CHECKPOINT_EVERY.value,
                      keep_checkpoints=KEEP_CHECKPOINTS.value,
                      max_consecutive_bad_steps=MAX_BAD_STEPS.value,
                      log_rollouts_every=ROLLOUTS_EVERY.value, eval_every=EVAL_EVERY.value)
  step = LearnerConfig(
      algo=ALGO.value, num_generations=NUM_GENERATIONS.value, train_batch_size=TRAIN_BATCH.value,
      micro_batch_size=MICRO_BATCH.value, num_updates_per_rollout=UPDATES_PER_ROLLOUT.value,
      max_new_tokens=MAX_NEW_TOKENS.value, **_kl_terms(), loss=_policy_loss(),
      reward_shapers=tuple(REWARD_SHAPERS.value),
      shaping=shaping.ShapingOptions(overlong_buffer=OVERLONG_BUFFER.value,
                                     overlong_penalty=OVERLONG_PENALTY.value),
      batch_filter=BATCH_FILTER.value or None, max_draws=MAX_DRAWS.value,
      mask_truncated=MASK_TRUNCATED.value, offload_reference=OFFLOAD_REFERENCE.value,
      pack_steps=PACK_STEPS.value)
  rl = RLConfig(
      step=step, sampling=SamplingParams(temperature=TEMPERATURE.value, top_p=TOP_P.value,
                                         top_k=TOP_K.value),
      optimizer=OptimizerConfig(learning_rate=LEARNING_RATE.value, schedule=LR_SCHEDULE.value,
                                warmup_steps=WARMUP_STEPS.value, weight_decay=WEIGHT_DECAY.value,
                                grad_clip=GRAD_CLIP.value),
      rollout_batch_size=ROLLOUT_BATCH.value, rollout_chunk_size=ROLLOUT_CHUNK.value,
      rollout_compact_every=ROLLOUT_COMPACT.value,
      epochs=EPOCHS.value, max_steps=MAX_STEPS.value, seed=SEED.value, loop=loop)
  sft = SftConfig(
      total_steps=SFT_STEPS.value, targets=TargetConfig(kind=SFT_TARGET.value),
      batch_size=SFT_BATCH.value, micro_batch_size=MICRO_BATCH.value,
      optimizer=OptimizerConfig(learning_rate=SFT_LEARNING_RATE.value, schedule="cosine",
                                warmup_steps=5, weight_decay=WEIGHT_DECAY.value,
                                grad_clip=GRAD_CLIP.value),
      loop=loop)
  return RunConfig(
      workdir=epath.Path(WORKDIR.value), mode=MODE.value, stage=STAGE.value, seed=SEED.value,
      mesh=MESH.value, rollout_tensor_parallel=ROLLOUT_TENSOR.value,
      distributed=Distributed(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value),
      model=ModelSpec(name=MODEL.value, tokenizer=TOKENIZER.value,
                      compute_dtype=COMPUTE_DTYPE.value, remat=REMAT.value,
                      attention=ATTENTION.value),
      data=DataSpec(path=pathlib.Path(DATA.value) if DATA.value else None,
                    sim_tasks=tuple(SIM_TASKS.value), sim_episodes=SIM_EPISODES.value,
                    image_size=IMAGE_SIZE.value, prompt_style=PROMPT_STYLE.value,
                    answer_format=ANSWER_FORMAT.value),
      init_from=pathlib.Path(INIT_FROM.value) if INIT_FROM.value else None,
      sft=sft, rl=rl,
      eval=EvalConfig(max_new_tokens=MAX_NEW_TOKENS.value, batch_size=EVAL_BATCH.value),
      closed_loop=ClosedLoopSpec(policies=tuple(CLOSED_LOOP_POLICY.value),
                                 episodes=CLOSED_LOOP_EPISODES.value,
                                 in_training=CLOSED_LOOP_TRAIN_EPISODES.value),
      judge=JudgeSpec(kind=JUDGE.value, base_url=JUDGE_BASE_URL.value, model=JUDGE_MODEL.value,
                      timeout_s=JUDGE_TIMEOUT.value),
      compile_only=COMPILE_ONLY.value, topology=TOPOLOGY.value,
      compile_executables=tuple(COMPILE_EXECUTABLES.value) if COMPILE_EXECUTABLES.value else None,
      compile_prompt_length=COMPILE_PROMPT_LENGTH.value,
      flags={f.name: f.value for f in flags.FLAGS.get_flags_for_module(__name__)})
