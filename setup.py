"""sacpo_jax: constrained alignment of LLaMA-family models (SACPO, P-SACPO, CAID) in JAX."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="sacpo_jax",
    version="0.1.0",
    description="Stepwise and dual constrained alignment (SACPO, P-SACPO, CAID) in JAX/Flax",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["sacpo_jax", "sacpo_jax.*"]),
    package_data={"sacpo_jax": ["configs/*.yaml"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "transformers>=5.0",
        "datasets>=5.0",
        "tokenizers>=0.22",
        "numpy",
        "scipy",
        "ml_dtypes",
        "pyyaml",
        "pydantic>=2",
        "tqdm",
        "matplotlib",
        "tensorboardX",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",  # the README's test command runs two workers
            "ruff",
            "import-linter",
            "sentencepiece",
            "mistral-common",
            "protobuf",
            "tensorflow-datasets",
            "array_record",
            "trl==1.16.0",  # tests/test_trl_losses.py calls TRL's own loss code
            "peft",
        ],
        "torch": ["torch==2.13.0"],
        "tfds": ["tensorflow-datasets", "array_record"],
        "wandb": ["wandb"],
    },
    entry_points={
        "console_scripts": [
            "sacpo-train=sacpo_jax.train:main",
        ]
    },
)
