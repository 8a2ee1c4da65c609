"""Serves a Megatron checkpoint over an OpenAI-compatible API (FastAPI + uvicorn).

    python tools/serve_judge.py --load checkpoints/judge --port 8000 --model-name judge
    torchrun --nproc-per-node 2 tools/serve_judge.py --load checkpoints/judge \\
        --tensor-model-parallel-size 2
    python -m megatron_sip.train_sip ... --judge-backend openai \\
        --judge-url http://127.0.0.1:8000 --judge-model judge

Endpoints: ``GET /health`` (no authentication), ``GET /v1/models``, ``POST /v1/completions``
(OpenAI's legacy schema plus vLLM's ``add_special_tokens``) and ``POST /v1/chat/completions``
(OpenAI's chat schema through the checkpoint tokenizer's own chat template, plus vLLM's
``add_generation_prompt``, ``continue_final_message`` and ``chat_template_kwargs``).
Log-probabilities are the model's full-vocabulary log-softmax (the temperature-1 distribution),
exactly what the colocated judge reads. Concurrent requests share forward passes
(``--max-batch-prompts``), taken round-robin across requests.

The server binds 127.0.0.1 unless ``--host`` says otherwise (a non-loopback address needs
``--api-key-env``), prints ``serving NAME on http://HOST:PORT`` once ready, and shuts down cleanly
(exit 0) on SIGTERM or SIGINT. Every flag and limit: docs/serving.md.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys
import warnings

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from megatron_sip.arguments import build_parser, config_from_namespace
from megatron_sip.errors import ConfigError
from megatron_sip.initialize import ParallelConfig
from megatron_sip.log import setup_logging
from megatron_sip.platform import PlatformConfig
from megatron_sip.serving.config import ServingConfig
from megatron_sip.serving.server import main as serve_main

GROUPS = {"serving": ServingConfig, "platform": PlatformConfig, "parallel": ParallelConfig}


def parse_args(argv=None) -> tuple[ServingConfig, PlatformConfig, ParallelConfig]:
    parser = build_parser(GROUPS, description=__doc__)
    namespace = parser.parse_args(argv)
    try:
        return tuple(config_from_namespace(cls, namespace) for cls in GROUPS.values())
    except ConfigError as error:
        parser.error(str(error))


def main(argv=None) -> int:
    serving, platform, parallel = parse_args(argv)
    setup_logging()
    return serve_main(serving, platform, parallel)


if __name__ == "__main__":
    sys.exit(main())
