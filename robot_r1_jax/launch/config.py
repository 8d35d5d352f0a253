"""The run's typed configuration: what `flags.run_config()` reads the command line into."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from etils import epath

from robot_r1_jax.data.prompts import MCQA, PAPER
from robot_r1_jax.stages.evaluate import EvalConfig
from robot_r1_jax.stages.rl import RLConfig
from robot_r1_jax.stages.sft import SftConfig

MODES = ("train", "eval", "closed_loop")
STAGES = ("sft_rl", "sft", "rl")
POLICIES = ("model", "oracle", "random")  # closed-loop policies (see stages.closed_loop)
JUDGES = ("none", "rule", "chat")  # judges of open-ended answers (see stages.judge)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  name: str = "tiny"  # a preset (random weights) or a local Hugging Face directory
  tokenizer: str | None = None  # a tokenizer directory; None: the model's, else the packaged one
  compute_dtype: str = "float32"  # activations; parameters stay float32
  remat: bool = False  # recompute decoder layers and vision blocks in the backward pass
  attention: str = "auto"  # model.attention.IMPLEMENTATIONS; auto: splash on TPU, else xla


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Extracted shards, or the simulated demos the default job makes under WORKDIR/data."""

  path: pathlib.Path | None = None
  sim_tasks: tuple[str, ...] = ("pick_up_cup", "push_button")
  sim_episodes: int = 3
  image_size: int = 128
  prompt_style: str = PAPER
  answer_format: str = MCQA


@dataclasses.dataclass(frozen=True)
class ClosedLoopSpec:
  """--mode=closed_loop: the policies compared and the episodes per task (tasks: --sim_tasks);
  `in_training`: episodes per task the sft_rl job on simulated data runs before and after RL."""

  policies: tuple[str, ...] = ("model", "oracle", "random")
  episodes: int = 5
  in_training: int = 1

  def __post_init__(self):
    bad = [p for p in self.policies if p not in POLICIES]
    if bad or not self.policies:
      raise ValueError(f"closed_loop_policy={list(self.policies)}: choose from {list(POLICIES)}")
    if self.episodes < 1:
      raise ValueError(f"closed_loop_episodes={self.episodes} must be >= 1")
    if self.in_training < 0:
      raise ValueError(f"closed_loop_train_episodes={self.in_training} must be >= 0")


@dataclasses.dataclass(frozen=True)
class JudgeSpec:
  """--mode=eval: who scores the open-ended answers 0-3 (see stages.judge)."""

  kind: str = "none"  # none | rule | chat
  base_url: str | None = None  # chat: an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1
  model: str | None = None  # chat: the served judge model
  timeout_s: float = 30.0

  def __post_init__(self):
    if self.kind not in JUDGES:
      raise ValueError(f"judge={self.kind!r}: choose from {list(JUDGES)}")
    if self.kind == "chat" and not (self.base_url and self.model):
      raise ValueError("judge=chat needs --judge_base_url and --judge_model")
    if self.timeout_s <= 0:
      raise ValueError(f"judge_timeout={self.timeout_s} must be > 0")


@dataclasses.dataclass(frozen=True)
class Distributed:
  """jax.distributed settings (all None: one process, or auto-detection where JAX does it)."""

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
  workdir: epath.Path  # local, or an object store (gs://…)
  mode: str = "train"  # train | eval | closed_loop
  stage: str = "sft_rl"  # sft_rl | sft | rl
  seed: int = 0
  mesh: str = "data=1,fsdp=-1,tensor=1"
  rollout_tensor_parallel: int = 0  # the sampler's rollout layout (0: derived; see SamplerConfig)
  distributed: Distributed = Distributed()
  model: ModelSpec = ModelSpec()
  data: DataSpec = DataSpec()
  init_from: pathlib.Path | None = None  # a run whose newest parameters start this one
  sft: SftConfig = SftConfig(total_steps=60)
  rl: RLConfig = RLConfig()
  eval: EvalConfig = EvalConfig()
  closed_loop: ClosedLoopSpec = ClosedLoopSpec()
  judge: JudgeSpec = JudgeSpec()
  compile_only: bool = False  # compile every executable for `topology`, report memory, stop
  topology: str | None = None  # a TPU slice, e.g. "v5e:4x4"
  compile_executables: tuple[str, ...] | None = None  # only these (None: every one)
  compile_prompt_length: int = 0  # the prompt bucket to compile at (0: derived from the prompts)
  flags: dict[str, Any] = dataclasses.field(default_factory=dict)  # recorded with checkpoints

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode={self.mode!r} is not one of {list(MODES)}")
    if self.stage not in STAGES:
      raise ValueError(f"stage={self.stage!r} is not one of {list(STAGES)}")
    if self.judge.kind != "none" and self.mode != "eval":
      raise ValueError(f"--judge={self.judge.kind} scores an evaluation: add --mode=eval")
    if self.compile_only and not self.topology:
      raise ValueError("--compile_only needs --topology, e.g. --topology=v5e:4x4")

  @property
  def runs_sft(self) -> bool:
    return self.mode == "train" and self.stage in ("sft_rl", "sft")

  @property
  def runs_rl(self) -> bool:
    return self.mode == "train" and self.stage in ("sft_rl", "rl")

  @property
  def evaluates(self) -> bool:
    """Eval mode; sft_rl (before and after RL); rl with --eval_every."""
    return self.mode in ("eval", "closed_loop") or (self.mode == "train" and (
        self.stage == "sft_rl" or (self.stage == "rl" and bool(self.rl.loop.eval_every))))

  @property
  def batch_sizes(self) -> dict[str, int]:
    """Every global batch the run splits over devices and processes, by its flag (only those of
    the stages it runs)."""
    rl = self.rl
    return {**({"sft_batch_size": self.sft.batch_size} if self.runs_sft else {}),
            **({"eval_batch_size": self.eval.batch_size} if self.evaluates else {}),
            **({"rollout_batch_size": rl.rollout_batch_size,
                "micro_batch_size": rl.step.micro_batch_size} if self.runs_rl else {}),
            **({"rollout_chunk_size": rl.rollout_chunk_size}
               if self.runs_rl and rl.rollout_chunk_size else {})}
