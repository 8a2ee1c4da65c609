"""Rollout and scoring benchmark: shared-prefix KV-cached generation vs full recompute, and
shared-prefix packed scoring vs one sequence per candidate, measured in one run.

    python tools/bench/bench_rollouts_scoring.py                 # CPU, a small Llama-style model
    python tools/bench/bench_rollouts_scoring.py --device cuda   # GPU

Prints a table and, last, one JSON line with the ratios (baseline over ours; higher is better):
scoring_token_ratio, scoring_speedup, scoring_memory_ratio, generation_speedup.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import psutil
import torch

from megatron_sip.inference.generation import generate, generate_by_recompute
from megatron_sip.inference.sampling import SamplingConfig
from megatron_sip.inference.scoring import (
    candidate_log_probs,
    forward_packed,
    pack_candidates,
    unpack_candidates,
)
from megatron_sip.initialize import ParallelConfig, destroy_distributed, initialize_distributed
from megatron_sip.models.checkpointing import unwrap_model
from megatron_sip.models.config import ModelConfig
from megatron_sip.models.gpt import build_model
from megatron_sip.platform import torch_device


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-attention-heads", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--suffix-len", type=int, default=128)
    parser.add_argument(
        "--candidates", type=int, default=18, help="C = K rollouts + original + rewrite"
    )
    parser.add_argument("--prefixes", type=int, default=1, help="prefixes per scoring batch")
    parser.add_argument("--gen-prefixes", type=int, default=2)
    parser.add_argument("--gen-samples", type=int, default=4, help="K rollouts per prefix")
    parser.add_argument("--gen-prefix-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


class PeakMemory:
    """Peak memory above the starting point: CUDA allocator stats, or sampled RSS on CPU."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.process = psutil.Process(os.getpid())
            self.start = self.peak = self.process.memory_info().rss
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()
            self.bytes = self.peak - self.start


def timed(device: str, fn, repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    args = parse_args(argv)
    context = initialize_distributed(ParallelConfig(), args.device, seed=1234)
    model_config = ModelConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        seq_length=args.prefix_len + args.candidates * args.suffix_len,
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
    model = unwrap_model(chunks[0])
    device = torch_device()
    generator = torch.Generator().manual_seed(0)

    def random_tokens(*shape):
        return torch.randint(0, args.vocab_size, shape, generator=generator).tolist()

    # Scoring: forward + backward of the candidates' sequence log-probs.
    prefixes = random_tokens(args.prefixes, args.prefix_len)
    candidates = [random_tokens(args.candidates, args.suffix_len) for _ in prefixes]
    layouts = {
        "packed": pack_candidates(prefixes, candidates).to(device),
        "unpacked": unpack_candidates(prefixes, candidates).to(device),
    }
    results = {}
    for name, packed in layouts.items():

        def step(packed=packed):
            model.zero_grad(set_to_none=True)
            logits = forward_packed(model, packed)
            candidate_log_probs(logits, packed).sum().backward()

        with PeakMemory(args.device) as memory:
            step()
        seconds = timed(args.device, step, args.repeats)
        results[name] = {
            "tokens": packed.tokens_processed,
            "seconds": seconds,
            "peak_bytes": memory.bytes,
        }
        del packed

    # Generation: K rollouts of N tokens per prefix.
    gen_prefixes = random_tokens(args.gen_prefixes, args.gen_prefix_len)
    sampling = SamplingConfig()
    kwargs = dict(
        num_samples=args.gen_samples, num_tokens=args.suffix_len, sampling=sampling, seed=0
    )
    new_tokens = args.gen_prefixes * args.gen_samples * args.suffix_len
    cached = timed(
        args.device, lambda: generate(model, gen_prefixes, **kwargs), max(1, args.repeats - 2)
    )
    recompute = timed(args.device, lambda: generate_by_recompute(model, gen_prefixes, **kwargs), 1)

    packed, unpacked = results["packed"], results["unpacked"]
    print(
        f"model: {args.num_layers} layers, hidden {args.hidden_size}, "
        f"vocab {args.vocab_size}, device {args.device}"
    )
    print(
        f"scoring: prefix {args.prefix_len}, C={args.candidates} candidates of "
        f"{args.suffix_len} tokens, forward+backward"
    )
    print(f"{'layout':<10}{'tokens':>10}{'seconds':>10}{'peak MiB':>10}")
    for name, row in results.items():
        mib = row["peak_bytes"] / 2**20
        print(f"{name:<10}{row['tokens']:>10}{row['seconds']:>10.3f}{mib:>10.0f}")
    print(
        f"generation: {args.gen_prefixes} prefixes of {args.gen_prefix_len} x K={args.gen_samples} "
        f"samples x {args.suffix_len} new tokens"
    )
    print(f"{'engine':<10}{'seconds':>10}{'tokens/s':>10}")
    for name, seconds in (("cached", cached), ("recompute", recompute)):
        print(f"{name:<10}{seconds:>10.3f}{new_tokens / seconds:>10.1f}")
    ratios = {
        "scoring_token_ratio": round(unpacked["tokens"] / packed["tokens"], 3),
        "scoring_speedup": round(unpacked["seconds"] / packed["seconds"], 3),
        "scoring_memory_ratio": round(unpacked["peak_bytes"] / max(packed["peak_bytes"], 1), 3),
        "generation_speedup": round(recompute / cached, 3),
    }
    destroy_distributed()
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
