"""Which judge and rewriter a job uses (``--judge-backend``, ``--rewriter-backend``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, Optional

from megatron_sip.errors import ConfigError, require_choice
from megatron_sip.roles.base import Judge, Rewriter

JUDGE_BACKENDS = ("oracle",)
REWRITER_BACKENDS = ("oracle",)


@dataclasses.dataclass
class JudgeConfig:
    """The judge that scores candidates."""

    judge_backend: Literal["oracle"] = "oracle"
    """Judge implementation: oracle (rules over the embedded-default corpus's labels and
    knowledge base)."""

    judge_oracle_data: Optional[str] = None
    """Directory written by tools/build_demo_corpus.py (its oracle.json) for --judge-backend
    oracle."""

    def __post_init__(self):
        require_choice("--judge-backend", self.judge_backend, JUDGE_BACKENDS)
        if self.judge_backend == "oracle" and not self.judge_oracle_data:
            raise ConfigError(
                "--judge-oracle-data", "--judge-backend oracle needs the demo corpus directory"
            )


@dataclasses.dataclass
class RewriterConfig:
    """The rewriter that improves original suffixes."""

    rewriter_backend: Literal["oracle"] = "oracle"
    """Rewriter implementation: oracle (recorded clean versions of the embedded-default
    corpus's unsafe and false spans)."""

    rewriter_oracle_data: Optional[str] = None
    """Directory written by tools/build_demo_corpus.py for --rewriter-backend oracle."""

    def __post_init__(self):
        require_choice("--rewriter-backend", self.rewriter_backend, REWRITER_BACKENDS)
        if self.rewriter_backend == "oracle" and not self.rewriter_oracle_data:
            raise ConfigError(
                "--rewriter-oracle-data",
                "--rewriter-backend oracle needs the demo corpus directory",
            )


def _oracle_judge(config: JudgeConfig) -> Judge:
    from megatron_sip.roles.oracle import OracleJudge

    return OracleJudge(config.judge_oracle_data)


def _oracle_rewriter(config: RewriterConfig) -> Rewriter:
    from megatron_sip.roles.oracle import OracleRewriter

    return OracleRewriter(config.rewriter_oracle_data)


# Backend name -> factory. Model-backed and remote backends register here.
JUDGE_FACTORIES: dict[str, Callable[[JudgeConfig], Judge]] = {"oracle": _oracle_judge}
REWRITER_FACTORIES: dict[str, Callable[[RewriterConfig], Rewriter]] = {"oracle": _oracle_rewriter}


def build_judge(config: JudgeConfig) -> Judge:
    return JUDGE_FACTORIES[config.judge_backend](config)


def build_rewriter(config: RewriterConfig) -> Rewriter:
    return REWRITER_FACTORIES[config.rewriter_backend](config)
