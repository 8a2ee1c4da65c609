"""What each change to the rollout engine bought, measured in one run: ``generate`` (K rollouts
per prefix, the SIP step benchmark's default shape) with the changes of issue 19 undone one by
one, beside transformers' ``generate`` on the same weights.

    python tools/bench/bench_generation_changes.py          # default shape, fp32 on the CPU
    python tools/bench/bench_generation_changes.py --tiny

Rows, each adding one change to the row above it:

1. Megatron-Core's static-batch decode without flash decode (un-rotated keys cached, RoPE applied
   to the whole key cache in every layer at every token), ``torch.multinomial`` sampling;
2. two-level inverse-CDF sampling (``inference/sampling.py: draw``);
3. flash decode: each key rotated once before it is cached, Megatron-Core's flash-decode path with
   ``megatron_sip.platform``'s CPU kernel;
4. shared-prefix attention: the kernel reads each prefix's keys and values once for its K
   samples (megatron-sip as it is).

The earlier rows are reproduced by switching the later changes off in this process (the model's
``flash_decode`` setting, and this script's stand-ins for ``draw`` and the shared-prefix
declaration). Every row samples with the same seed. Prints the table and, last, a JSON line of
each row's seconds and the final speedup over transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sip_step import add_shape_arguments, apply_tiny, hf_model_from  # noqa: E402

from megatron_sip.inference import generation, sampling  # noqa: E402
from megatron_sip.inference.sampling import SamplingConfig  # noqa: E402
from megatron_sip.initialize import (  # noqa: E402
    ParallelConfig,
    destroy_distributed,
    initialize_distributed,
)
from megatron_sip.models.checkpointing import unwrap_model  # noqa: E402
from megatron_sip.models.config import ModelConfig  # noqa: E402
from megatron_sip.models.gpt import build_model  # noqa: E402

ROWS = (
    ("megatron-core static decode, torch.multinomial", "before"),
    ("+ two-level inverse-CDF sampling", "sampling"),
    ("+ flash decode (keys rotated once)", "flash_decode"),
    ("+ shared-prefix attention (megatron-sip)", "shared_prefix"),
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_shape_arguments(parser)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after a warm-up")
    parser.add_argument("--seed", type=int, default=1234)
    return apply_tiny(parser.parse_args(argv))


def multinomial_draw(log_probs, generator):
    return torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(-1)


@contextlib.contextmanager
def changes_up_to(model, row: str):
    """The engine with the changes after ``row`` switched off."""
    order = [name for _, name in ROWS]
    applied = set(order[: order.index(row) + 1])
    config = unwrap_model(model).config
    saved = config.flash_decode, sampling.draw, generation.shared_prefix_decoding
    try:
        if "sampling" not in applied:
            sampling.draw = multinomial_draw
        if "flash_decode" not in applied:
            config.flash_decode = False
        if "shared_prefix" not in applied:
            generation.shared_prefix_decoding = lambda *args: contextlib.nullcontext()
        yield
    finally:
        config.flash_decode, sampling.draw, generation.shared_prefix_decoding = saved


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    args = parse_args(argv)
    context = initialize_distributed(ParallelConfig(), "cpu", seed=args.seed)
    model_config = ModelConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        group_query_attention=bool(args.num_query_groups),
        ffn_hidden_size=args.ffn_hidden_size,
        seq_length=args.prefix_len + args.suffix_len,
        position_embedding_type="rope",
        normalization="RMSNorm",
        swiglu=True,
        untie_embeddings_and_output_weights=True,
        disable_bias_linear=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        transformer_impl="local",
    )
    chunks, _ = build_model(model_config, ParallelConfig(), args.vocab_size, context.pg_collection)
    model = chunks[0]
    generator = torch.Generator().manual_seed(args.seed)
    prefixes = torch.randint(
        0, args.vocab_size - 1, (args.prefixes, args.prefix_len), generator=generator
    )
    eod = args.vocab_size - 1
    new_tokens = args.prefixes * args.num_rollouts * args.suffix_len

    def ours():
        return generation.generate(
            model,
            prefixes.tolist(),
            num_samples=args.num_rollouts,
            num_tokens=args.suffix_len,
            sampling=SamplingConfig(),
            seed=args.seed,
            eod=eod,
        )

    seconds = {}
    for _, row in ROWS:
        with changes_up_to(model, row):
            seconds[row] = timed(ours, args.repeats)
    hf = hf_model_from(model_config, unwrap_model(model), args.vocab_size, torch.float32).eval()

    @torch.no_grad()
    def transformers_generate():
        return hf.generate(
            input_ids=prefixes,
            attention_mask=torch.ones_like(prefixes),
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=args.suffix_len,
            num_return_sequences=args.num_rollouts,
            eos_token_id=eod,
            pad_token_id=eod,
        )

    seconds["transformers"] = timed(transformers_generate, args.repeats)
    destroy_distributed()

    print(
        f"generate: {args.prefixes} prefixes x {args.prefix_len} tokens, K={args.num_rollouts} x "
        f"{args.suffix_len} new tokens; {args.num_layers} layers, hidden {args.hidden_size}, "
        f"vocab {args.vocab_size}, fp32 CPU; medians of {args.repeats} runs after a warm-up"
    )
    print(f"{'engine':<50}{'seconds':>9}{'tokens/s':>10}{'vs row above':>14}{'vs HF':>8}")
    previous = None
    for label, row in (*ROWS, ("transformers generate (num_return_sequences)", "transformers")):
        value = seconds[row]
        step = f"{previous / value:.2f}x" if previous and row != "transformers" else ""
        print(
            f"{label:<50}{value:>9.3f}{new_tokens / value:>10.0f}{step:>14}"
            f"{seconds['transformers'] / value:>7.2f}x"
        )
        previous = value
    summary = {f"{row}_s": round(value, 3) for row, value in seconds.items()}
    summary["generation_speedup"] = round(seconds["transformers"] / seconds["shared_prefix"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
