from setuptools import find_packages, setup

setup(
    name="grpo_jax",
    version="0.1.0",
    description="DeepSeek-R1-style reinforcement learning (GRPO) of language models in JAX",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["grpo_jax", "grpo_jax.*"]),
    # The R1-Zero demo's tiny base models (see grpo_jax/demo_base.py for the recipe that rebuilds them).
    package_data={"grpo_jax": ["assets/*/*"]},
    install_requires=[
        "jax>=0.9",  # plain `jax` is the CPU build: no TPU- or CUDA-only wheels in the core install
        "flax>=0.11",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.90",
        "transformers>=4.50",
        "tokenizers>=0.21",
        "safetensors>=0.5",
        "jinja2>=3.1",
        "numpy>=1.26",
        "tqdm>=4.66",
        "gguf>=0.17",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        # torch and peft only serve the parity tests against transformers' and PEFT's PyTorch models; trl (with
        # math-verify, which its accuracy rewards need) the tests that run TRL's own reward functions.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "pyarrow>=15", "torch==2.13.0", "peft>=0.21", "trl==1.16.0",
                 "math-verify==0.9.0"],
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
        "data": ["tensorflow-datasets>=4.9", "grain>=0.2", "pyarrow>=15"],
    },
)
