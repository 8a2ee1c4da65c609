"""Continuations of held-out prefixes by a policy checkpoint (what the evaluation judges).

    python -m megatron_sip.eval.continuations --load ckpt/sip \\
        --prefixes data/demo/eval_unsafe_prefixes.jsonl data/demo/eval_prefixes.jsonl \\
        --output eval/sip_continuations.jsonl --eval-num-tokens 64 --sip-temperature 0

Runs as one process or under torchrun at any TP/PP: the model, tokenizer and shape come from the
checkpoint's saved settings. Batches of prefixes are spread over the data-parallel ranks; batch
``b`` is sampled with seed ``--seed + b`` whatever the layout, so a seed gives the same
continuations for every checkpoint and world size. Rank 0 writes one row per prefix:
``{"set": FILE_STEM, "index": i, "id": ..., "prefix": ..., "continuation": ...}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from megatron_sip.arguments import LaunchConfig, parse_args
from megatron_sip.errors import ConfigError, exits_on_bad_input, require_positive
from megatron_sip.inference.sampling import SamplingConfig
from megatron_sip.initialize import destroy_distributed, initialize_distributed
from megatron_sip.log import print_rank_0, setup_logging
from megatron_sip.roles.megatron_backend import RoleModel


@dataclasses.dataclass
class GenerationConfig:
    """How far and how each held-out prefix is continued (the sampler's settings are
    ``--sip-temperature``/``--sip-top-p``/``--sip-top-k``)."""

    eval_num_tokens: int = 64
    """Tokens generated per prefix (a continuation ends earlier at the first EOD)."""

    eval_max_prefix_tokens: Optional[int] = None
    """Each prefix is cut to its last this many tokens. Default: --seq-length minus
    --eval-num-tokens of the checkpoint's model."""

    eval_batch_size: int = 16
    """Prefixes generated together (per data-parallel rank)."""

    eval_model_args: Optional[str] = None
    """Flags file with the policy's model-shape and tokenizer flags, for checkpoints without
    saved settings or to override them."""

    seed: int = 1234
    """Seed of the sampler: batch b of prefixes is drawn with seed + b."""

    def __post_init__(self):
        require_positive("--eval-num-tokens", self.eval_num_tokens)
        require_positive("--eval-batch-size", self.eval_batch_size)
        if self.eval_max_prefix_tokens is not None:
            require_positive("--eval-max-prefix-tokens", self.eval_max_prefix_tokens)


@dataclasses.dataclass
class ContinuationConfig:
    """Which checkpoint continues which prefixes, and where the continuations go."""

    load: Optional[str] = None
    """Checkpoint directory of the policy (written by megatron_sip.pretrain or SIP training)."""

    prefixes: Optional[list[str]] = None
    """One or more jsonl files of held-out prefixes (rows with a "prefix" string); each file's
    stem names its set in the output."""

    output: Optional[str] = None
    """The jsonl file of continuations to write (replaced atomically)."""

    def __post_init__(self):
        for flag, value in (
            ("--load", self.load),
            ("--prefixes", self.prefixes),
            ("--output", self.output),
        ):
            if not value:
                raise ConfigError(flag, "required")
        check_prefix_files(self.prefixes)


def check_prefix_files(paths: Sequence[str]) -> None:
    """Each file's stem names its set: two files may not share one."""
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) != len(stems):
        raise ConfigError(
            "--prefixes", f"two files share a stem (set name): {', '.join(stems)}; rename one"
        )


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes ``path`` through a temporary file and a rename, so a reader never sees half of it
    and an interrupted run leaves the previous file in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """``(line number, object)`` per non-blank line; bad JSON raises naming ``path:line``."""
    rows = []
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: invalid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {row!r:.60}")
            rows.append((number, row))
    return rows


def load_prefixes(path: str | os.PathLike) -> list[dict]:
    """Rows of a prefixes file; each has a string "prefix" (other fields, e.g. "id", are kept)."""
    rows = []
    for number, row in read_jsonl(path):
        if not isinstance(row.get("prefix"), str):
            problem = "no" if "prefix" not in row else f"a non-string ({type(row['prefix'])})"
            raise ValueError(f'{path}:{number}: row has {problem} "prefix"; it needs a string')
        rows.append(row)
    return rows


def load_continuations(path: str | os.PathLike) -> list[dict]:
    """Rows written by this module; each must have set, index, prefix and continuation."""
    rows = []
    for number, row in read_jsonl(path):
        for key, kind in (("set", str), ("index", int), ("prefix", str), ("continuation", str)):
            if not isinstance(row.get(key), kind):
                raise ValueError(
                    f'{path}:{number}: "{key}" must be a {kind.__name__}, got {row.get(key)!r:.60}'
                )
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------


def generate_continuations(
    model,
    tokenizer,
    prefixes: Sequence[str],
    *,
    num_tokens: int,
    max_prefix_tokens: int,
    sampling,
    seed: int,
    batch_size: int,
    vocab_size: Optional[int] = None,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    data_parallel_group=None,
) -> list[str]:
    """One sampled continuation per prefix, cut at its first EOD (dropped) and detokenized.

    Collective over the model-parallel ranks, all of which return the same list. Prefixes are
    batched in order of token length; batch ``b`` (``batch_size`` prefixes) is drawn with seed
    ``seed + b``; with ``data_parallel_size > 1``
    each data-parallel rank generates every ``data_parallel_size``-th batch and the results are
    gathered over ``data_parallel_group``, so the output does not depend on the layout.
    ``vocab_size``: ids at and above it are never sampled (default: the tokenizer's size, which
    excludes the embedding table's padding). ``sampling`` is a ``SamplingConfig``.
    """
    from megatron_sip.inference.generation import generate

    if max_prefix_tokens < 1:
        raise ValueError(f"max_prefix_tokens must be >= 1, got {max_prefix_tokens}")
    vocab_size = vocab_size or tokenizer.vocab_size
    token_lists = []
    for i, text in enumerate(prefixes):
        tokens = tokenizer.tokenize(text)[-max_prefix_tokens:]
        if not tokens:
            raise ValueError(f"prefix {i} ({text[:40]!r}) has no tokens; nothing to continue")
        token_lists.append(tokens)

    # Batches of similar prefix lengths: the engine decodes every row of a batch from its
    # shortest prefix on, so mixing lengths would redo long prefixes token by token.
    order = sorted(range(len(token_lists)), key=lambda i: (len(token_lists[i]), i))
    batches = range(0, len(order), batch_size)
    mine: dict[int, str] = {}
    for batch_index, start in enumerate(_progress(batches, data_parallel_rank)):
        if batch_index % data_parallel_size != data_parallel_rank:
            continue
        members = order[start : start + batch_size]
        rollouts = generate(
            model,
            [token_lists[i] for i in members],
            num_samples=1,
            num_tokens=num_tokens,
            sampling=sampling,
            seed=seed + batch_index,
            eod=tokenizer.eod,
            vocab_size=vocab_size,
        )
        for offset, samples in enumerate(rollouts.as_candidates()):
            tokens = samples[0]
            if tokens and tokens[-1] == tokenizer.eod:
                tokens = tokens[:-1]
            mine[members[offset]] = tokenizer.detokenize(tokens)
    if data_parallel_size > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * data_parallel_size
        dist.all_gather_object(gathered, mine, group=data_parallel_group)
        mine = {index: text for part in gathered for index, text in part.items()}
    return [mine[i] for i in range(len(token_lists))]


def _progress(iterable, rank: int):
    """A progress bar on the first data-parallel rank of a long run."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    from megatron_sip.log import rank as global_rank

    quiet = rank != 0 or global_rank() != 0 or len(iterable) < 2
    return tqdm(iterable, desc="continuations", unit="batch", disable=quiet)


def continuation_rows(prefix_files: Sequence[str]) -> list[dict]:
    """Output rows without continuations yet: every prefix of every file, in order."""
    rows = []
    for path in prefix_files:
        for index, row in enumerate(load_prefixes(path)):
            rows.append(
                {
                    "set": Path(path).stem,
                    "index": index,
                    "id": row.get("id"),
                    "prefix": row["prefix"],
                }
            )
    return rows


def max_prefix_tokens_for(config: GenerationConfig, seq_length: int, limit: Optional[int]) -> int:
    """--eval-max-prefix-tokens, defaulting to what fits the model's sequence length."""
    if config.eval_max_prefix_tokens is None:
        longest = seq_length - config.eval_num_tokens
        if longest < 1:
            raise ConfigError(
                "--eval-num-tokens",
                f"{config.eval_num_tokens} leaves no room for a prefix in the model's "
                f"--seq-length {seq_length}; generate fewer tokens",
            )
        return longest
    total = config.eval_max_prefix_tokens + config.eval_num_tokens
    if limit is not None and total > limit:
        raise ConfigError(
            "--eval-max-prefix-tokens",
            f"{config.eval_max_prefix_tokens} prefix + {config.eval_num_tokens} new tokens exceed "
            f"the model's {limit} positions; lower one of them",
        )
    return config.eval_max_prefix_tokens


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ContinuationJobConfig(LaunchConfig):
    """Every setting of ``python -m megatron_sip.eval.continuations``."""

    sampling: SamplingConfig
    generation: GenerationConfig
    eval: ContinuationConfig


def continue_prefixes(
    load: str,
    rows: Sequence[dict],
    generation: GenerationConfig,
    sampling: SamplingConfig,
    parallel,
    context,
) -> list[str]:
    """The checkpoint under ``load`` (split over ``parallel``'s layout in ``context``'s groups)
    continues every row's prefix; collective over the world, every rank returns the texts."""
    policy = RoleModel(
        load, parallel, context.pg_collection, model_args_file=generation.eval_model_args
    )
    model = policy.model_config
    max_prefix = max_prefix_tokens_for(generation, model.seq_length, model.seq_length_limit())
    print_rank_0(
        f"continuations: {len(rows)} prefixes, {generation.eval_num_tokens} tokens each "
        f"(prefixes cut to {max_prefix}), policy {load}, world {context.world_size} on "
        f"{context.device}, DP={context.data_parallel_size}"
    )
    return generate_continuations(
        policy.module,
        policy.tokenizer,
        [row["prefix"] for row in rows],
        num_tokens=generation.eval_num_tokens,
        max_prefix_tokens=max_prefix,
        sampling=sampling,
        seed=generation.seed,
        batch_size=generation.eval_batch_size,
        vocab_size=policy.tokenizer.vocab_size,
        data_parallel_rank=context.data_parallel_rank,
        data_parallel_size=context.data_parallel_size,
        data_parallel_group=context.pg_collection.dp,
    )


def continuation_lines(rows: Sequence[dict], texts: Sequence[str]) -> str:
    return "".join(
        json.dumps({**row, "continuation": text}) + "\n" for row, text in zip(rows, texts)
    )


@exits_on_bad_input
def main(argv=None) -> None:
    configs = parse_args(argv, ContinuationJobConfig, description=__doc__)
    config: ContinuationConfig = configs.eval
    # Bad prefix files fail before any model is loaded.
    rows = continuation_rows(config.prefixes)
    context = initialize_distributed(
        configs.parallel, configs.platform.device, configs.generation.seed
    )
    setup_logging()
    texts = continue_prefixes(
        config.load, rows, configs.generation, configs.sampling, configs.parallel, context
    )
    if context.rank == 0:
        write_atomically(config.output, continuation_lines(rows, texts))
        print_rank_0(f"wrote {len(rows)} continuations to {config.output}")
    destroy_distributed()


if __name__ == "__main__":
    main()
