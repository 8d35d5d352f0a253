"""What every stage of a run shares: the model, its tokenizer, the mesh and the extracted data."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from jax.sharding import Mesh

from robot_r1_jax.data.loader import LoaderConfig
from robot_r1_jax.generate import sampling
from robot_r1_jax.generate.sampler import Sampler, SamplerConfig
from robot_r1_jax.model.qwen2_5_vl import Qwen25VL


@dataclasses.dataclass(frozen=True)
class StageContext:
  """The parts of a run that the SFT, RL and evaluation stages all use."""

  model: Qwen25VL  # trained in place by each stage
  tokenizer: Any  # a transformers tokenizer (the loader's)
  mesh: Mesh
  data_dir: pathlib.Path  # an extractor output (manifest.json + shards)
  loader: LoaderConfig  # preprocessing every stage shares (tokenizer path, seed, buckets)
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # recorded with checkpoints
  tensor_parallel: int = 0  # the samplers' rollout layout (see SamplerConfig)

  def sampler(self, params: sampling.SamplingParams, num_samples: int = 1,
              chunk_prompts: int = 0, compact_every: int = 0) -> Sampler:
    """A sampler of the context's model that stops at end of turn or text and detokenises
    (`chunk_prompts`, `compact_every`: see `SamplerConfig`)."""
    stop = tuple(t for t in (self.model.cfg.eos_token_id, self.tokenizer.pad_token_id)
                 if t is not None)
    return Sampler(self.model, SamplerConfig(stop_tokens=stop, num_samples=num_samples,
                                             pad_id=self.tokenizer.pad_token_id,
                                             sampling=params, chunk_prompts=chunk_prompts,
                                             compact_every=compact_every,
                                             tensor_parallel=self.tensor_parallel),
                   mesh=self.mesh, tokenizer=self.tokenizer)
