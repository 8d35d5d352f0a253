"""`python -m robot_r1_jax.launch`: the main job.

Until the trainer lands (issue 8) this runs the model half of the pipeline on its embedded default:
the tiny Qwen2.5-VL preset, a random left-padded batch, one full forward and a KV-cache prefill plus
greedy decode, and prints shapes and logit statistics. It downloads nothing.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from robot_r1_jax import model as model_lib

_PRESET = flags.DEFINE_enum("model", "tiny", sorted(model_lib.PRESETS), "Model preset to build.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Prompts in the demo batch.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 8, "Greedy tokens to decode with the KV cache.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for weights and inputs.")


def main(argv):
  del argv
  cfg = model_lib.PRESETS[_PRESET.value]()
  model = model_lib.init_model(cfg, seed=_SEED.value)
  rng = np.random.default_rng(_SEED.value)
  batch, length = _BATCH.value, 16
  lengths = rng.integers(4, length + 1, size=batch)
  mask = (np.arange(length)[None] >= length - lengths[:, None]).astype(np.int32)
  ids = np.where(mask, rng.integers(0, cfg.image_token_id, size=(batch, length)), 0)

  start = time.perf_counter()
  logits = jax.block_until_ready(nnx.jit(lambda m, i, a: m(i, a))(model, ids, mask))
  print(f"model={_PRESET.value} devices={jax.device_count()} logits {logits.shape} "
        f"{logits.dtype} mean={float(logits.mean()):+.4f} std={float(logits.std()):.4f} "
        f"({time.perf_counter() - start:.1f}s incl. compile)")

  @nnx.jit
  def prefill(m, i, a, cache):
    return m.forward(i, a, cache=cache)

  @nnx.jit
  def step(m, token, cache, num_real, deltas):
    out = m.forward(token, cache=cache, positions=model_lib.decode_positions(num_real, deltas),
                    rope_deltas=deltas)
    return out, jnp.argmax(out.logits[:, -1], axis=-1)

  out = prefill(model, ids, mask, model.init_cache(batch, length + _NEW_TOKENS.value))
  token, num_real, generated = jnp.argmax(out.logits[:, -1], -1), jnp.asarray(mask.sum(1)), []
  for _ in range(_NEW_TOKENS.value):
    generated.append(np.asarray(token))
    out, token = step(model, token[:, None], out.cache, num_real, out.rope_deltas)
    num_real = num_real + 1
  print("greedy continuation token ids (random weights):")
  for b, row in enumerate(np.stack(generated, 1)):
    print(f"  prompt {b} ({lengths[b]} tokens): {row.tolist()}")


if __name__ == "__main__":
  app.run(main)
