"""`python -m robot_r1_jax.export --run=RUN_DIR --out=HF_DIR`: see `robot_r1_jax.export`."""

from __future__ import annotations

from absl import app, flags

from robot_r1_jax.export import DTYPES, export_run
from robot_r1_jax.launch import console
from robot_r1_jax.model.config import ConfigError
from robot_r1_jax.train.checkpoint import CheckpointError

RUN = flags.DEFINE_string("run", None, "A run directory (its newest stage: rl, then sft), a stage "
                          "directory, or a checkpoints folder.", required=True)
OUT = flags.DEFINE_string("out", None, "The Hugging Face directory to write (replaced "
                          "atomically if it exists).", required=True)
STEP = flags.DEFINE_integer("step", None, "The checkpoint step. Default: the newest.")
DTYPE = flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Tensor dtype of the safetensors: "
                          "float32 keeps the trained values exactly; bfloat16 halves the size "
                          "(what Qwen2.5-VL's own checkpoints use).")

MAX_SHARD_MB = flags.DEFINE_integer("max_shard_mb", 2048, "Largest safetensors file in MiB; "
                                    "more tensors go in further files listed by "
                                    "model.safetensors.index.json.", lower_bound=1)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.quiet_libraries()
  with console.one_line_errors(CheckpointError, ConfigError, FileNotFoundError):
    done = export_run(RUN.value, OUT.value, step=STEP.value, dtype=DTYPE.value,
                      max_shard_bytes=MAX_SHARD_MB.value << 20)
  print(f"exported step {done.step} of {done.checkpoints} (--model={done.model}) to {done.out}: "
        f"{', '.join(done.files)}")


if __name__ == "__main__":
  console.skip_absent_tpu()
  app.run(main)
