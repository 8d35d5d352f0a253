"""Generation: the batched sampler (one prefill per prompt, G samples, a compiled decode loop) and
its pure token-choice pieces. RL rollouts, evaluation and users share it.

    sampler = Sampler(model, SamplerConfig(stop_tokens=(eos,), num_samples=5,
                                           sampling=SamplingParams(temperature=1.0, top_p=0.99)),
                      mesh=mesh, tokenizer=tokenizer)
    out = sampler(prompt_ids, prompt_mask, key, max_new_tokens=256,
                  pixel_values=pixels, image_grid_thw=grids)     # SamplerOutput, B·G rows
"""

from robot_r1_jax.generate.batching import bucket, left_pad
from robot_r1_jax.generate.sampler import (DecodeState, FinishReason, Sampler, SamplerConfig,
                                           SamplerOutput)
from robot_r1_jax.generate.sampling import Choice, SamplingParams, choose, top_k_mask, top_p_mask

__all__ = [
    "Choice", "DecodeState", "FinishReason", "Sampler", "SamplerConfig", "SamplerOutput",
    "SamplingParams", "bucket", "choose", "left_pad", "top_k_mask", "top_p_mask",
]
