"""robot_r1_jax: Qwen2.5-VL trained with RL for robot-motion reasoning (Robot-R1), in JAX/Flax.

Layers, each importing only the ones before it (tests/test_layers.py keeps it so):

    model → data → generate → rl → train → stages → launch → export

  model     Qwen2.5-VL: configs, vision tower, text decoder, HF safetensors, processor, sharding
  data      RLBench demos → keyframes → questions → ArrayRecord shards → grain batches; the sim
  generate  the sampler (prefill, decode loop) and its pure token-choice pieces
  rl        RL maths as pure functions: rewards, advantage estimators, KL penalty, policy loss
  train     machinery that knows no stage: optimizer, scoring, the update, loop, checkpoints
  stages    SFT, the RL step and stage, evaluation
  launch    `python -m robot_r1_jax.launch`: flags → typed configs → stages
  export    `python -m robot_r1_jax.export`: a trained run → a Hugging Face directory

Dimensions: one alphabet in einsum strings, shape comments and docstrings everywhere.

  B  batch rows (prompts; sequences once G samples of each are drawn: B·G rows)
  G  samples (completions) per prompt
  M  micro-batches of one optimizer update
  T  tokens of a model call; in the sampler and the scorers, the prompt (its bucket)
  R  completion (response) tokens: the new-token bucket, or the width completions are cut to
  S  key/value slots of a KV cache (when sampling: a row's own R after its prompt's T)
  D  model width            F  MLP width              V  vocabulary        L  layers
  N  query heads            K  key/value heads        Q  query heads per key/value head (N = K·Q)
  H  head dim               P  vision patches (each a 1176-vector: 3 channels × 2 × 14 × 14)
  C  the fused (q, k, v) axis of the vision tower's attention projection (length 3)
"""
