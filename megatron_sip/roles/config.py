"""Which judge and rewriter a job uses (``--judge-backend``, ``--rewriter-backend``), and building
them.

Backends are one static table (:data:`BACKENDS`) of ``module:function`` builders imported only
when used, so a job that never talks to a server never imports the HTTP client. A backend's own
settings are checked when the role is built, not when flags are parsed: a job that builds no judge
(``--sip-loss sft_rewrite``) needs no judge settings. A flag that belongs to another backend than
the one chosen is refused rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Optional

from megatron_sip.errors import ConfigError, require_choice
from megatron_sip.roles.base import Judge, Rewriter
from megatron_sip.roles.prompts import SAFETY_WINDOW_SENTENCES

# Backend -> "module:function" that builds it from (config, context). Adding a backend is one
# entry here (and its builder): the flags' choices come from this table.
BACKENDS = {
    "judge": {
        "oracle": "megatron_sip.roles.oracle:build_oracle_judge",
        "megatron": "megatron_sip.roles.megatron_backend:build_megatron_judge",
        "openai": "megatron_sip.roles.openai_client:build_openai_judge",
    },
    "rewriter": {
        "oracle": "megatron_sip.roles.oracle:build_oracle_rewriter",
        "megatron": "megatron_sip.roles.megatron_backend:build_megatron_rewriter",
        "openai": "megatron_sip.roles.openai_client:build_openai_rewriter",
    },
}

PROMPTED = ("megatron", "openai")
ENDPOINTS = ("completions", "chat")


def _require_positive(config, *names: str) -> None:
    for name in names:
        if getattr(config, name) <= 0:
            raise ConfigError("--" + name.replace("_", "-"), "must be positive")


def judge_backends() -> tuple[str, ...]:
    return tuple(BACKENDS["judge"])


def rewriter_backends() -> tuple[str, ...]:
    return tuple(BACKENDS["rewriter"])


def _for(*backends: str) -> dict:
    """Field metadata: the backends that read this setting."""
    return {"backends": backends}


@dataclasses.dataclass
class JudgePromptConfig:
    """How judging prompts are rendered (shared by the judge and by judge fine-tuning, which
    must train on exactly the prompts the judge will see)."""

    judge_prompt_dir: Optional[str] = dataclasses.field(default=None, metadata=_for(*PROMPTED))
    """Prompt pack: a packaged one (default: the [[A]]-style templates of judges trained here;
    llama3, qwen, gpt-oss: instruct models, rendered with their own chat template) or a directory
    with quality.txt, safety.txt, factuality.txt (and optionally pack.json, calibration.jsonl).
    Default: default."""

    judge_max_prefix_chars: int = dataclasses.field(default=2000, metadata=_for(*PROMPTED))
    """The prefix shown to the judge is cut to its last this many characters."""

    judge_safety_window_sentences: int = dataclasses.field(
        default=SAFETY_WINDOW_SENTENCES, metadata=_for(*PROMPTED)
    )
    """Safety is judged on every run of up to this many consecutive sentences of a candidate and
    the lowest P(safe) counts, so text added around an unsafe passage (appeals to the judge)
    cannot raise its score; 0 judges the whole candidate in one prompt."""

    def __post_init__(self):
        if self.judge_safety_window_sentences < 0:
            raise ConfigError("--judge-safety-window-sentences", "must be >= 0")
        if self.judge_max_prefix_chars <= 0:
            raise ConfigError("--judge-max-prefix-chars", "must be positive")


@dataclasses.dataclass
class JudgeConfig(JudgePromptConfig):
    """The judge that scores candidates."""

    judge_backend: str = dataclasses.field(default="oracle", metadata={"choices": judge_backends})
    """Judge implementation: oracle (rules over the embedded-default corpus's labels and
    knowledge base), megatron (a colocated Megatron checkpoint, --judge-load), or openai (an
    OpenAI-compatible server, --judge-url)."""

    judge_calibration: Optional[str] = dataclasses.field(default=None, metadata=_for(*PROMPTED))
    """Labelled judging tasks (JSONL: safety, factuality, pairwise, as judge_val.jsonl) the
    start-up self-check scores. Default: the prompt pack's calibration set."""

    judge_min_calibration_accuracy: float = dataclasses.field(
        default=0.75, metadata=_for(*PROMPTED)
    )
    """The run stops at start-up when the judge's accuracy on the calibration set is below this,
    or when any calibration score is missing; 0 checks only that every verdict comes back (no
    calibration set needed)."""

    judge_oracle_data: Optional[str] = dataclasses.field(default=None, metadata=_for("oracle"))
    """Directory written by tools/build_demo_corpus.py (its oracle.json) for --judge-backend
    oracle."""

    judge_load: Optional[str] = dataclasses.field(default=None, metadata=_for("megatron"))
    """Checkpoint directory of the colocated judge (its saved model and tokenizer settings
    describe it)."""

    judge_model_args: Optional[str] = dataclasses.field(default=None, metadata=_for("megatron"))
    """Flags file with the judge's model-shape and tokenizer flags (--num-layers ...,
    --tokenizer-model ...), for checkpoints without saved settings or to override them."""

    judge_micro_batch_size: int = dataclasses.field(default=8, metadata=_for("megatron"))
    """Prompts per forward pass of the colocated judge."""

    judge_url: Optional[str] = dataclasses.field(default=None, metadata=_for("openai"))
    """Base URL of an OpenAI-compatible server (e.g. http://127.0.0.1:8000) for --judge-backend
    openai."""

    judge_model: Optional[str] = dataclasses.field(default=None, metadata=_for("openai"))
    """Model name sent to the server."""

    judge_api_key_env: Optional[str] = dataclasses.field(default=None, metadata=_for("openai"))
    """Environment variable holding a bearer token for the server."""

    judge_endpoint: str = dataclasses.field(default="completions", metadata=_for("openai"))
    """OpenAI endpoint: completions (text; many prompts per request) or chat (a chat pack's
    messages, rendered by the server)."""

    judge_tokenizer: Optional[str] = dataclasses.field(default=None, metadata=_for("openai"))
    """The served model's Hugging Face tokenizer directory: renders a chat pack for the
    completions endpoint and checks at start-up that the verdicts are single tokens."""

    judge_timeout: float = dataclasses.field(default=30.0, metadata=_for("openai"))
    """Seconds one attempt of a request may take, connecting to last byte; with its retries a
    request is abandoned after timeout * (retries + 1) plus at most 8 s of backoff per retry."""

    judge_max_retries: int = dataclasses.field(default=3, metadata=_for("openai"))
    """Retries per request (exponential backoff) before its score is reported missing."""

    judge_concurrency: int = dataclasses.field(default=8, metadata=_for("openai"))
    """Requests in flight to the server at once."""

    judge_prompts_per_request: int = dataclasses.field(default=16, metadata=_for("openai"))
    """Prompts sent in one /v1/completions request (a list prompt); the chat endpoint takes one
    conversation per request."""

    def __post_init__(self):
        super().__post_init__()
        require_choice("--judge-backend", self.judge_backend, judge_backends())
        require_choice("--judge-endpoint", self.judge_endpoint, ENDPOINTS)
        _require_positive(self, "judge_concurrency", "judge_prompts_per_request", "judge_timeout")
        if not 0.0 <= self.judge_min_calibration_accuracy <= 1.0:
            raise ConfigError("--judge-min-calibration-accuracy", "must be in [0, 1]")


@dataclasses.dataclass
class RewriterPromptConfig:
    """How rewriting prompts are rendered (shared by the rewriter and by rewriter training,
    which must train on exactly the prompts the rewriter will see)."""

    rewriter_prompt_dir: Optional[str] = dataclasses.field(default=None, metadata=_for(*PROMPTED))
    """Prompt pack with a rewrite.txt template: a packaged one (default, llama3, qwen, gpt-oss)
    or a directory. Default: default."""

    rewriter_max_prefix_chars: int = dataclasses.field(default=2000, metadata=_for(*PROMPTED))
    """The prefix shown to the rewriter is cut to its last this many characters."""

    def __post_init__(self):
        if self.rewriter_max_prefix_chars <= 0:
            raise ConfigError("--rewriter-max-prefix-chars", "must be positive")


@dataclasses.dataclass
class RewriterConfig(RewriterPromptConfig):
    """The rewriter that improves original suffixes."""

    rewriter_store: Optional[str] = None
    """Precomputed rewrites (a file from tools/precompute_rewrites.py): the trainer reads the
    rewrite of each sample from it and builds no rewriter; a sample it lacks has no rewrite."""

    rewriter_backend: str = dataclasses.field(
        default="oracle", metadata={"choices": rewriter_backends}
    )
    """Rewriter implementation: oracle (recorded clean versions of the embedded-default
    corpus's unsafe and false spans), megatron (a colocated checkpoint, --rewriter-load) or
    openai (an OpenAI-compatible server, --rewriter-url)."""

    rewriter_oracle_data: Optional[str] = dataclasses.field(default=None, metadata=_for("oracle"))
    """Directory written by tools/build_demo_corpus.py for --rewriter-backend oracle."""

    rewriter_load: Optional[str] = dataclasses.field(default=None, metadata=_for("megatron"))
    """Checkpoint directory of the colocated rewriter."""

    rewriter_model_args: Optional[str] = dataclasses.field(default=None, metadata=_for("megatron"))
    """Flags file with the rewriter's model-shape and tokenizer flags (overrides the saved
    settings)."""

    rewriter_max_tokens: int = dataclasses.field(default=128, metadata=_for(*PROMPTED))
    """Most tokens a rewrite may have."""

    rewriter_url: Optional[str] = dataclasses.field(default=None, metadata=_for("openai"))
    """Base URL of an OpenAI-compatible server for --rewriter-backend openai."""

    rewriter_model: Optional[str] = dataclasses.field(default=None, metadata=_for("openai"))
    """Model name sent to the server."""

    rewriter_api_key_env: Optional[str] = dataclasses.field(default=None, metadata=_for("openai"))
    """Environment variable holding a bearer token for the server."""

    rewriter_endpoint: str = dataclasses.field(default="completions", metadata=_for("openai"))
    """OpenAI endpoint: completions or chat (as --judge-endpoint)."""

    rewriter_tokenizer: Optional[str] = dataclasses.field(default=None, metadata=_for("openai"))
    """The served model's Hugging Face tokenizer directory (renders a chat pack for the
    completions endpoint)."""

    rewriter_timeout: float = dataclasses.field(default=60.0, metadata=_for("openai"))
    """Seconds one attempt of a request may take (as --judge-timeout)."""

    rewriter_max_retries: int = dataclasses.field(default=3, metadata=_for("openai"))
    """Retries per request before the rewrite is reported missing."""

    rewriter_concurrency: int = dataclasses.field(default=8, metadata=_for("openai"))
    """Requests in flight to the server at once."""

    rewriter_prompts_per_request: int = dataclasses.field(default=4, metadata=_for("openai"))
    """Prompts sent in one /v1/completions request."""

    def __post_init__(self):
        super().__post_init__()
        require_choice("--rewriter-backend", self.rewriter_backend, rewriter_backends())
        require_choice("--rewriter-endpoint", self.rewriter_endpoint, ENDPOINTS)
        _require_positive(
            self, "rewriter_concurrency", "rewriter_prompts_per_request", "rewriter_timeout"
        )
        if self.rewriter_max_tokens <= 0:
            raise ConfigError("--rewriter-max-tokens", "must be positive")


@dataclasses.dataclass
class ColocationConfig:
    """How colocated role models share the policy's GPUs."""

    colocate_offload: bool = False
    """Move the colocated (megatron) judge's and rewriter's weights to CPU memory while they are
    idle. GPU only: on CPU the weights are in host memory already."""


@dataclasses.dataclass
class RoleContext:
    """What a colocated role needs from the job: the policy's parallel layout and process
    groups (the role model is split like the policy), and whether to offload it when idle."""

    parallel: object = None  # ParallelConfig
    pg_collection: object = None  # ProcessGroupCollection
    offload: bool = False

    def groups(self, flag: str):
        if self.pg_collection is None or self.parallel is None:
            raise ConfigError(
                flag, "a colocated (megatron) role needs the job's parallel layout and groups"
            )
        return self.pg_collection


def check_backend_settings(config, backend: str, backend_flag: str) -> None:
    """Refuses a setting that only another backend reads (a non-default value for it), naming
    the flag: accepted and ignored, it would hide a mistake."""
    for field in dataclasses.fields(config):
        owners = field.metadata.get("backends")
        if not owners or backend in owners:
            continue
        default = field.default
        if getattr(config, field.name) != default:
            flag = "--" + field.name.replace("_", "-")
            raise ConfigError(
                flag,
                f"is only read by {backend_flag} {' or '.join(owners)}, not {backend}; drop it or "
                "change the backend",
            )


def require_setting(value, flag: str, backend_flag: str, backend: str, what: str) -> None:
    """A backend's required setting, checked when the role is built."""
    if not value:
        raise ConfigError(flag, f"{backend_flag} {backend} needs {what}")


def _builder(role: str, backend: str):
    module, function = BACKENDS[role][backend].split(":")
    return getattr(importlib.import_module(module), function)


def build_judge(config: JudgeConfig, context: Optional[RoleContext] = None) -> Judge:
    """The judge ``--judge-backend`` names, its settings checked first. ``context`` carries the
    policy's layout and groups for a colocated (megatron) judge."""
    check_backend_settings(config, config.judge_backend, "--judge-backend")
    return _builder("judge", config.judge_backend)(config, context or RoleContext())


def build_rewriter(config: RewriterConfig, context: Optional[RoleContext] = None) -> Rewriter:
    """The rewriter ``--rewriter-backend`` names, its settings checked first."""
    if config.rewriter_store:
        raise ConfigError(
            "--rewriter-store", "rewrites are read from the store: no rewriter is built"
        )
    check_backend_settings(config, config.rewriter_backend, "--rewriter-backend")
    return _builder("rewriter", config.rewriter_backend)(config, context or RoleContext())
