"""A tiny judge for the tests: the demo corpus, a SentencePiece tokenizer whose verdict strings
are single tokens, and Megatron checkpoints (random or fine-tuned on the verdicts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from megatron_sip.data.config import TokenizerConfig

from .distributed import run_ranks
from .pretrain_utils import ROOT, run_module

VERDICTS = ["[[A]]", "[[B]]", "[[SAFE]]", "[[UNSAFE]]", "[[YES]]", "[[NO]]"]
JUDGE_ARGS = [
    "--device", "cpu", "--num-layers", "2", "--hidden-size", "96", "--ffn-hidden-size", "256",
    "--num-attention-heads", "4", "--seq-length", "384", "--max-position-embeddings", "384",
    "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
    "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--hidden-dropout", "0",
    "--attention-dropout", "0", "--transformer-impl", "local",
]  # fmt: skip
MAX_PREFIX_CHARS = 300


def build_demo_and_tokenizer(root: Path) -> tuple[Path, TokenizerConfig]:
    demo = root / "demo"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "build_demo_corpus.py"), "--output-dir", str(demo),
         "--seed", "7"], check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), "--input",
         str(demo / "corpus.jsonl"), "--vocab-size", "1024", "--output-prefix", str(root / "tok"),
         "--input-sentence-size", "4000", "--user-defined-symbols", *VERDICTS],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return demo, TokenizerConfig(
        tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=str(root / "tok.model")
    )


def _save_random_judge(root: str, tokenizer_model: str) -> None:
    from megatron_sip.arguments import parse_args
    from megatron_sip.data.tokenizers import build_tokenizer
    from megatron_sip.initialize import destroy_distributed, initialize_distributed
    from megatron_sip.models.checkpointing import save_checkpoint
    from megatron_sip.training.setup import setup_model_and_optimizer

    flags = [*JUDGE_ARGS, "--tokenizer-type", "GPTSentencePieceTokenizer",
             "--tokenizer-model", tokenizer_model, "--train-iters", "0"]  # fmt: skip
    configs = parse_args(flags, world_size=1, exit_on_error=False)
    context = initialize_distributed(configs.parallel, "cpu", 5)
    tokenizer = build_tokenizer(configs.tokenizer)
    job = setup_model_and_optimizer(
        configs.model, configs.parallel, configs.training, configs.tokenizer,
        tokenizer.vocab_size, context,
    )  # fmt: skip
    save_checkpoint(root, 0, job.model_chunks, extra_common=job.metadata)
    destroy_distributed()


def save_random_judge(root: Path, tokenizer: TokenizerConfig) -> Path:
    run_ranks(_save_random_judge, 1, str(root), tokenizer.tokenizer_model)
    return root


def train_judge(
    root: Path, demo: Path, tokenizer: TokenizerConfig, iters: int, tasks: str = "safety"
) -> str:
    """Fine-tunes a tiny judge on the demo judge_train.jsonl verdicts; returns its output."""
    return run_module(
        1, "megatron_sip.training.judge_sft", *JUDGE_ARGS,
        "--tokenizer-type", "GPTSentencePieceTokenizer",
        "--tokenizer-model", tokenizer.tokenizer_model,
        "--judge-train-data", str(demo / "judge_train.jsonl"),
        "--judge-max-prefix-chars", str(MAX_PREFIX_CHARS), "--judge-train-tasks", tasks,
        "--micro-batch-size", "8", "--train-iters", str(iters), "--lr", "3e-3",
        "--min-lr", "3e-4", "--lr-warmup-iters", "20", "--lr-decay-style", "cosine",
        "--clip-grad", "1.0", "--log-interval", "50", "--save", str(root),
    )  # fmt: skip
