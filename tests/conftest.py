"""Test-wide setup: 8 fake CPU devices for sharding tests, no network, the shared fixtures."""

import os

# Must happen before jax is first imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests compile the same tiny programs in many places (and in launched subprocesses): a persistent
# compilation cache shared by the session turns the repeats into loads.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# tests/testing.py's fixtures (the tokenizer, meshes) for every test.
pytest_plugins = ("testing",)
