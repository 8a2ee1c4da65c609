"""Which judge and rewriter a job uses (``--judge-backend``, ``--rewriter-backend``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, Optional

from megatron_sip.errors import ConfigError, require_choice
from megatron_sip.roles.base import Judge, Rewriter

JUDGE_BACKENDS = ("oracle", "megatron", "openai")
REWRITER_BACKENDS = ("oracle", "megatron", "openai")


@dataclasses.dataclass
class JudgeConfig:
    """The judge that scores candidates."""

    judge_backend: Literal["oracle", "megatron", "openai"] = "oracle"
    """Judge implementation: oracle (rules over the embedded-default corpus's labels and
    knowledge base), megatron (a colocated Megatron checkpoint, --judge-load), or openai (an
    OpenAI-compatible /v1/completions server, --judge-url)."""

    judge_oracle_data: Optional[str] = None
    """Directory written by tools/build_demo_corpus.py (its oracle.json) for --judge-backend
    oracle."""

    judge_load: Optional[str] = None
    """Checkpoint directory of the colocated judge (its saved model and tokenizer settings
    describe it)."""

    judge_model_args: Optional[str] = None
    """Flags file with the judge's model-shape and tokenizer flags (--num-layers ...,
    --tokenizer-model ...), for checkpoints without saved settings or to override them."""

    judge_prompt_dir: Optional[str] = None
    """Directory with quality.txt, safety.txt, factuality.txt prompt templates. Default: the
    packaged ones."""

    judge_max_prefix_chars: int = 2000
    """The prefix shown to the judge is cut to its last this many characters."""

    judge_safety_window_sentences: int = 2
    """Safety is judged on every run of up to this many consecutive sentences of a candidate and
    the lowest P(safe) counts, so text added around an unsafe passage (appeals to the judge)
    cannot raise its score; 0 judges the whole candidate in one prompt."""

    judge_micro_batch_size: int = 8
    """Prompts per forward pass of the colocated judge."""

    judge_url: Optional[str] = None
    """Base URL of an OpenAI-compatible server (e.g. http://127.0.0.1:8000) for --judge-backend
    openai."""

    judge_model: Optional[str] = None
    """Model name sent to the server."""

    judge_api_key_env: Optional[str] = None
    """Environment variable holding a bearer token for the server."""

    judge_timeout: float = 30.0
    """Seconds before one request to the server is abandoned."""

    judge_max_retries: int = 3
    """Retries per request (exponential backoff) before its score is reported missing."""

    judge_concurrency: int = 8
    """Requests in flight to the server at once."""

    def __post_init__(self):
        require_choice("--judge-backend", self.judge_backend, JUDGE_BACKENDS)
        if self.judge_safety_window_sentences < 0:
            raise ConfigError("--judge-safety-window-sentences", "must be >= 0")
        if self.judge_backend == "oracle" and not self.judge_oracle_data:
            raise ConfigError(
                "--judge-oracle-data", "--judge-backend oracle needs the demo corpus directory"
            )
        if self.judge_backend == "megatron" and not self.judge_load:
            raise ConfigError("--judge-load", "--judge-backend megatron needs a checkpoint")
        if self.judge_backend == "openai" and not self.judge_url:
            raise ConfigError("--judge-url", "--judge-backend openai needs the server's URL")


@dataclasses.dataclass
class RewriterConfig:
    """The rewriter that improves original suffixes."""

    rewriter_store: Optional[str] = None
    """Precomputed rewrites (a file from tools/precompute_rewrites.py): the trainer reads the
    rewrite of each sample from it and builds no rewriter; a sample it lacks has no rewrite."""

    rewriter_backend: Literal["oracle", "megatron", "openai"] = "oracle"
    """Rewriter implementation: oracle (recorded clean versions of the embedded-default
    corpus's unsafe and false spans), megatron (a colocated checkpoint, --rewriter-load) or
    openai (an OpenAI-compatible server, --rewriter-url)."""

    rewriter_oracle_data: Optional[str] = None
    """Directory written by tools/build_demo_corpus.py for --rewriter-backend oracle."""

    rewriter_load: Optional[str] = None
    """Checkpoint directory of the colocated rewriter."""

    rewriter_model_args: Optional[str] = None
    """Flags file with the rewriter's model-shape and tokenizer flags (overrides the saved
    settings)."""

    rewriter_prompt_dir: Optional[str] = None
    """Directory with a rewrite.txt prompt template. Default: the packaged one."""

    rewriter_max_tokens: int = 128
    """Most tokens a rewrite may have."""

    rewriter_url: Optional[str] = None
    """Base URL of an OpenAI-compatible server for --rewriter-backend openai."""

    rewriter_model: Optional[str] = None
    """Model name sent to the server."""

    rewriter_api_key_env: Optional[str] = None
    """Environment variable holding a bearer token for the server."""

    rewriter_timeout: float = 60.0
    """Seconds before one request to the server is abandoned."""

    rewriter_max_retries: int = 3
    """Retries per request before the rewrite is reported missing."""

    def __post_init__(self):
        require_choice("--rewriter-backend", self.rewriter_backend, REWRITER_BACKENDS)
        if self.rewriter_store:
            return
        if self.rewriter_backend == "oracle" and not self.rewriter_oracle_data:
            raise ConfigError(
                "--rewriter-oracle-data",
                "--rewriter-backend oracle needs the demo corpus directory",
            )
        if self.rewriter_backend == "megatron" and not self.rewriter_load:
            raise ConfigError("--rewriter-load", "--rewriter-backend megatron needs a checkpoint")
        if self.rewriter_backend == "openai" and not self.rewriter_url:
            raise ConfigError("--rewriter-url", "--rewriter-backend openai needs the server's URL")


@dataclasses.dataclass
class ColocationConfig:
    """How colocated role models share the policy's GPUs."""

    colocate_offload: bool = False
    """Move the judge's and rewriter's weights to CPU memory while they are idle (GPU only)."""


def _oracle_judge(config: JudgeConfig, **context) -> Judge:
    from megatron_sip.roles.oracle import OracleJudge

    return OracleJudge(config.judge_oracle_data)


def _megatron_judge(config: JudgeConfig, *, parallel, offload: bool = False, **context) -> Judge:
    from megatron_sip.roles.megatron_backend import MegatronJudge, RoleModel
    from megatron_sip.roles.prompts import PromptSet

    return MegatronJudge(
        RoleModel(config.judge_load, parallel, model_args_file=config.judge_model_args),
        PromptSet.load(config.judge_prompt_dir),
        max_prefix_chars=config.judge_max_prefix_chars,
        micro_batch_size=config.judge_micro_batch_size,
        safety_window_sentences=config.judge_safety_window_sentences,
        offload=offload,
    )


def _oracle_rewriter(config: RewriterConfig, **context) -> Rewriter:
    from megatron_sip.roles.oracle import OracleRewriter

    return OracleRewriter(config.rewriter_oracle_data)


def _megatron_rewriter(
    config: RewriterConfig, *, parallel, offload: bool = False, **context
) -> Rewriter:
    from megatron_sip.roles.megatron_backend import MegatronRewriter, RoleModel
    from megatron_sip.roles.prompts import PromptSet

    return MegatronRewriter(
        RoleModel(config.rewriter_load, parallel, model_args_file=config.rewriter_model_args),
        PromptSet.load(config.rewriter_prompt_dir),
        max_tokens=config.rewriter_max_tokens,
        offload=offload,
    )


# Backend name -> factory(config, **context); context carries the parallel layout for
# colocated models. The remote backend registers itself from roles/openai_client.py.
JUDGE_FACTORIES: dict[str, Callable[..., Judge]] = {
    "oracle": _oracle_judge,
    "megatron": _megatron_judge,
}
REWRITER_FACTORIES: dict[str, Callable[..., Rewriter]] = {
    "oracle": _oracle_rewriter,
    "megatron": _megatron_rewriter,
}


def _ensure_remote_registered() -> None:
    import megatron_sip.roles.openai_client  # noqa: F401 (registers the "openai" backends)


def build_judge(config: JudgeConfig, **context) -> Judge:
    """The judge ``--judge-backend`` names; ``parallel=`` (the policy's ParallelConfig) is
    needed by the colocated backend."""
    if config.judge_backend == "openai":
        _ensure_remote_registered()
    return JUDGE_FACTORIES[config.judge_backend](config, **context)


def build_rewriter(config: RewriterConfig, **context) -> Rewriter:
    if config.rewriter_backend == "openai":
        _ensure_remote_registered()
    return REWRITER_FACTORIES[config.rewriter_backend](config, **context)
