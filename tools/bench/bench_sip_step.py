"""One whole SIP step (online DPO), ours beside the straightforward Hugging Face transformers step,
at the same shape and from the same initial weights, measured in one run.

    python tools/bench/bench_sip_step.py                    # default shape, fp32 on the CPU
    python tools/bench/bench_sip_step.py --tiny             # a tiny shape in seconds (make test)
    python tools/bench/bench_sip_step.py --profile prof/    # + a torch profile of our step
    python tools/bench/bench_sip_step.py --device cuda --bf16 \\
        --transformer-impl transformer_engine --num-layers 16 ...  # GPU (gpu_check.sh)

The step: K rollouts per prefix, a stand-in judge with seeded random scores (so the judge's cost
is not counted) and a stand-in rewriter (the original's tokens shuffled), selection (chosen = best
of original, rewrite and rollouts; rejected = worst rollout), candidate log-probs under the
policy and the EMA reference, the DPO loss, backward, optimizer step (AdamW, gradient clipping)
and the EMA update.

- ours: megatron-sip's SIP trainer itself (``train_sip.build_job`` with the stand-in roles, a
  random-token indexed dataset, ``SIPTrainer.step``).
- hf: what a practitioner writes with transformers: ``generate`` with ``num_return_sequences``,
  every prefix + candidate (original, rewrite, K rollouts) scored as its own padded sequence by
  ``log_softmax`` + ``gather`` under the policy (with gradients) and the reference (without),
  the same DPO loss, torch AdamW with the same settings, the same EMA.

Before timing, a check process builds both from the same weights and runs two updates on one
fixed batch of (chosen, rejected) pairs: the losses and margins must agree (the first at the
shared starting point, the second after each variant's own backward, clipping, AdamW and EMA),
or the benchmark stops. Each variant is then timed in its own process (its peak memory is the
process's resident memory, or CUDA allocations, above its level at the start of a step): one
warm-up step, then the median of ``--steps`` steps. Prints the phase table of both, tokens/s,
peak memory and, last, one JSON line: step_speedup, scoring_speedup, generation_speedup,
peak_memory_ratio (hf over ours; higher is better), hf_step_s, ours_step_s.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rollouts_scoring import PeakMemory  # noqa: E402

from megatron_sip.roles.base import Judge, Rewriter  # noqa: E402

TINY = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    ffn_hidden_size=176,
    vocab_size=512,
    prefixes=2,
    prefix_len=32,
    num_rollouts=4,
    suffix_len=8,
    steps=1,
)
# Phases of the step, in order; "score" sums reference and forward_backward.
PHASES = ("generate", "judge", "reference", "forward_backward", "optimizer", "ema")


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    shape = parser.add_argument_group("shape (a Llama-style model)")
    shape.add_argument("--num-layers", type=int, default=4)
    shape.add_argument("--hidden-size", type=int, default=256)
    shape.add_argument("--num-attention-heads", type=int, default=4)
    shape.add_argument("--num-query-groups", type=int, help="key/value heads (default: heads)")
    shape.add_argument("--ffn-hidden-size", type=int, default=688)
    shape.add_argument("--vocab-size", type=int, default=32000)
    shape.add_argument("--prefixes", type=int, default=2, help="prefixes per step (batch B)")
    shape.add_argument("--prefix-len", type=int, default=512)
    shape.add_argument("--num-rollouts", type=int, default=16, help="K rollouts per prefix")
    shape.add_argument("--suffix-len", type=int, default=128, help="N tokens per candidate")
    shape.add_argument("--tiny", action="store_true", help="a tiny shape, one measured step")


def apply_tiny(args: argparse.Namespace) -> argparse.Namespace:
    if args.tiny:
        for name, value in TINY.items():
            setattr(args, name, value)
    return args


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_shape_arguments(parser)
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    run.add_argument("--bf16", action="store_true", help="bf16 weights and compute (timed steps)")
    run.add_argument("--transformer-impl", default="local", choices=["local", "transformer_engine"])
    run.add_argument(
        "--flash-decode", action="store_true", help="GPU: flash-attn decoding (always on CPU)"
    )
    run.add_argument("--lr", type=float, default=1e-5)
    run.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up")
    run.add_argument("--variants", default="ours,hf", help="comma-separated: ours, hf")
    run.add_argument("--profile", type=Path, help="write a torch profile of our step here")
    run.add_argument(
        "--peak-tflops", type=float, help="device peak (dense) for MFU; H100/H200 found by name"
    )
    run.add_argument("--seed", type=int, default=1234)
    run.add_argument("--skip-check", action="store_true", help="time without the loss check")
    run.add_argument("--run", choices=["check", "ours", "hf"], help=argparse.SUPPRESS)
    run.add_argument("--corpus", help=argparse.SUPPRESS)
    run.add_argument("--result", help=argparse.SUPPRESS)
    return apply_tiny(parser.parse_args(argv))


# ---- the shared set-up: data, the SIP job, the stand-in roles --------------------------------


class RandomJudge(Judge):
    """Seeded uniform scores: a judge whose cost is not part of the step measured."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def _scores(self, texts) -> list[float]:
        return [self.rng.random() for _ in texts]

    def prefer(self, prefixes, firsts, seconds):
        return self._scores(firsts)

    def safety(self, prefixes, texts):
        return self._scores(texts)

    def factuality(self, prefixes, texts):
        return self._scores(texts)


class ShuffleRewriter(Rewriter):
    """The original suffix's tokens in a seeded random order (NullTokenizer text: ids)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def rewrite(self, prefixes, suffixes):
        out = []
        for suffix in suffixes:
            words = suffix.split()
            self.rng.shuffle(words)
            out.append(" ".join(words))
        return out


def write_corpus(directory: Path, args) -> str:
    """Random-token documents of exactly prefix + suffix tokens (one sample each), as a Megatron
    indexed dataset; never the end-of-document id."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(directory / "random_text_document")
    length = args.prefix_len + args.suffix_len
    documents = args.prefixes * (args.steps + 4)
    generator = np.random.default_rng(args.seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(documents):
        tokens = generator.integers(0, args.vocab_size - 1, size=length)
        builder.add_document(torch.from_numpy(tokens.astype(np.int32)), [length])
    builder.finalize(prefix + ".idx")
    return prefix


def sip_flags(args, corpus: str, *, bf16: bool) -> list[str]:
    length = args.prefix_len + args.suffix_len
    flags = [
        "--device", args.device, "--num-layers", str(args.num_layers),
        "--hidden-size", str(args.hidden_size), "--ffn-hidden-size", str(args.ffn_hidden_size),
        "--num-attention-heads", str(args.num_attention_heads), "--seq-length", str(length),
        "--max-position-embeddings", str(length), "--normalization", "RMSNorm", "--swiglu",
        "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
        "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
        "--transformer-impl", args.transformer_impl,
        # NullTokenizer ids are 0..V-2 and its end-of-document id is V-1: V ids in all.
        "--tokenizer-type", "NullTokenizer", "--vocab-size", str(args.vocab_size - 1),
        "--data-path", corpus, "--split", "100,0,0",
        "--micro-batch-size", str(args.prefixes), "--global-batch-size", str(args.prefixes),
        "--train-iters", str(args.steps + 4), "--eval-iters", "0",
        "--lr", str(args.lr), "--lr-warmup-iters", "0", "--lr-decay-style", "constant",
        "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
        "--adam-eps", "1e-8", "--clip-grad", "1.0", "--seed", str(args.seed),
        "--sip-loss", "online_dpo", "--sip-num-rollouts", str(args.num_rollouts),
        "--sip-suffix-len", str(args.suffix_len), "--sip-min-prefix-len", str(args.prefix_len),
        "--sip-objectives", "quality,safety,factuality",
    ]  # fmt: skip
    if args.num_query_groups:
        flags += ["--group-query-attention", "--num-query-groups", str(args.num_query_groups)]
    if args.flash_decode:
        flags.append("--flash-decode")
    return flags + (["--bf16"] if bf16 else [])


def build_sip_job(args, corpus: str, *, bf16: bool):
    """(job config, SIP job) in a fresh world of one; the stand-in roles are seeded."""
    from megatron_sip.arguments import parse_args as parse_job_args
    from megatron_sip.initialize import initialize_distributed
    from megatron_sip.train_sip import SIPJobConfig, build_job

    config = parse_job_args(
        sip_flags(args, corpus, bf16=bf16), SIPJobConfig, world_size=1, exit_on_error=False
    )
    context = initialize_distributed(config.parallel, config.platform.device, config.training.seed)
    roles = (RandomJudge(args.seed), ShuffleRewriter(args.seed))
    return config, build_job(config, context, roles=roles)


def hf_model_from(model_config, module, vocab_size: int, dtype: torch.dtype):
    """A transformers Llama with the weights of an unsplit Megatron model."""
    from transformers import AutoModelForCausalLM

    from megatron_sip.models.hf.convert import hf_state_dict

    hf_config, tensors = hf_state_dict(model_config, module, vocab_size)
    hf_config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.load_state_dict(tensors, strict=True)
    return model.to(device=next(module.parameters()).device, dtype=dtype)


# ---- the straightforward transformers step ---------------------------------------------------


class HFStep:
    """The SIP step written the straightforward way with transformers."""

    def __init__(self, policy, config, args):
        """``config``: our job's settings (optimizer, DPO beta, EMA decay, end-of-document id),
        so that both variants train alike."""
        import copy

        training = config.training
        self.policy, self.args, self.eod = policy, args, config.tokenizer.vocab_size
        self.beta, self.ema_decay = config.sip.sip_dpo_beta, config.sip.sip_ref_ema_decay
        self.clip_grad = training.clip_grad
        self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        # As Megatron: no weight decay on biases and norms (1-D parameters).
        decay = [p for p in policy.parameters() if p.ndim >= 2]
        no_decay = [p for p in policy.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": training.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=training.lr,
            betas=(training.adam_beta1, training.adam_beta2),
            eps=training.adam_eps,
        )
        self.rng = random.Random(args.seed)
        self.device = next(policy.parameters()).device

    def sequence_log_probs(self, model, prefix: list[int], candidates: list[list[int]]):
        """Each prefix + candidate as its own (right-padded) sequence: log_softmax + gather."""
        rows = [prefix + c for c in candidates]
        length = max(len(r) for r in rows)
        tokens = torch.full((len(rows), length), self.eod, dtype=torch.long)
        mask = torch.zeros(len(rows), length - 1)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row)
            mask[i, len(prefix) - 1 : len(row) - 1] = 1.0
        attention = (torch.arange(length) < torch.tensor([len(r) for r in rows])[:, None]).long()
        tokens, mask, attention = (t.to(self.device) for t in (tokens, mask, attention))
        logits = model(input_ids=tokens, attention_mask=attention).logits[:, :-1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        picked = log_probs.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
        return (picked * mask).sum(-1), tokens.numel()

    def update(self, pairs, times: dict, scored=None) -> dict:
        """One optimizer step on ``pairs`` [(prefix, candidates, chosen index, rejected index)];
        the loss is the mean over pairs of -log sigmoid(beta * margin)."""
        losses, margins = [], []
        positions = 0
        for prefix, candidates, chosen, rejected in pairs:
            start = time.perf_counter()
            with torch.no_grad():
                reference, _ = self.sequence_log_probs(self.reference, prefix, candidates)
            _sync()
            times["reference"] += time.perf_counter() - start
            start = time.perf_counter()
            policy, count = self.sequence_log_probs(self.policy, prefix, candidates)
            positions += count
            ratio = policy - reference
            margin = ratio[chosen] - ratio[rejected]
            loss = -torch.nn.functional.logsigmoid(self.beta * margin)
            (loss / len(pairs)).backward()
            _sync()
            times["forward_backward"] += time.perf_counter() - start
            losses.append(loss.item())
            margins.append(margin.item())
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync()
        times["optimizer"] += time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            for ref, param in zip(self.reference.parameters(), self.policy.parameters()):
                ref.mul_(self.ema_decay).add_(param, alpha=1.0 - self.ema_decay)
        _sync()
        times["ema"] += time.perf_counter() - start
        return {
            "loss": sum(losses) / len(losses),
            "margin": sum(margins) / len(margins),
            "positions": positions,
        }

    def step(self, samples) -> tuple[dict, dict]:
        """A whole step on the stream's samples: (phase seconds, info)."""
        args, times = self.args, dict.fromkeys(PHASES, 0.0)
        prefixes = torch.tensor(np.stack([s.prefix for s in samples])).to(self.device)
        start = time.perf_counter()
        self.policy.eval()
        with torch.no_grad():
            sequences = self.policy.generate(
                input_ids=prefixes,
                attention_mask=torch.ones_like(prefixes),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.suffix_len,
                num_return_sequences=args.num_rollouts,
                eos_token_id=self.eod,
                pad_token_id=self.eod,
            )
        self.policy.train()
        _sync()
        times["generate"] = time.perf_counter() - start
        start = time.perf_counter()
        new = sequences[:, prefixes.shape[1] :].tolist()
        pairs = []
        for i, sample in enumerate(samples):
            original = sample.suffix.tolist()
            rewrite = self.rng.sample(original, len(original))
            rollouts = [
                _cut_after(row, self.eod)
                for row in new[i * args.num_rollouts :][: args.num_rollouts]
            ]
            candidates = [original, rewrite, *rollouts]
            rewards = [self.rng.random() for _ in candidates]
            chosen = max(range(len(candidates)), key=rewards.__getitem__)
            rejected = min(range(2, len(candidates)), key=rewards.__getitem__)
            pairs.append((sample.prefix.tolist(), candidates, chosen, rejected))
        times["judge"] = time.perf_counter() - start
        info = self.update(pairs, times)
        return times, info


def _cut_after(row: list[int], eod: int) -> list[int]:
    return row[: row.index(eod) + 1] if eod in row else row


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# ---- the three processes --------------------------------------------------------------------


def fixed_pairs(job, args):
    """One fixed batch: the stream's first prefixes, chosen = the original, rejected = a seeded
    random continuation; as our trainer's scored samples and as the HF step's pairs."""
    from megatron_sip.training.sip.candidates import ScoredSample
    from megatron_sip.training.sip.selection import ORIGINAL, ROLLOUT, Candidate, Selection

    samples = next(job.trainer.stream)
    generator = random.Random(args.seed + 1)
    scored, pairs = [], []
    for sample in samples:
        prefix, original = sample.prefix.tolist(), sample.suffix.tolist()
        rollout = [generator.randrange(args.vocab_size - 1) for _ in range(args.suffix_len)]
        scored.append(
            ScoredSample(
                sample=sample,
                prefix=prefix,
                original=original,
                rewrite=None,
                rollouts=[rollout],
                rollout_log_probs=[0.0],
                scores={},
                rewards=None,
                selection=Selection(Candidate(ORIGINAL, 0), Candidate(ROLLOUT, 0)),
            )
        )
        pairs.append((prefix, [original, rollout], 0, 1))
    return [scored], pairs


def run_check(args) -> dict:
    """Both variants from the same weights, two updates on one fixed batch: same losses."""
    from megatron_sip.models.checkpointing import unwrap_model
    from megatron_sip.training.timers import PhaseTimes

    config, job = build_sip_job(args, args.corpus, bf16=False)
    trainer = job.trainer
    hf = HFStep(
        hf_model_from(
            config.model, unwrap_model(trainer.job.model_chunks[0]), args.vocab_size, torch.float32
        ),
        config,
        args,
    )
    scored, pairs = fixed_pairs(job, args)
    rows = []
    for update in range(2):
        ours = trainer.update(scored, update, PhaseTimes()).losses
        theirs = hf.update(pairs, dict.fromkeys(PHASES, 0.0))
        rows.append(
            {
                "update": update,
                "ours_loss": ours["loss"],
                "hf_loss": theirs["loss"],
                "ours_margin": ours["dpo margin"],
                "hf_margin": theirs["margin"],
            }
        )
    job.close()
    return {"rows": rows}


def run_ours(args) -> dict:
    config, job = build_sip_job(args, args.corpus, bf16=args.bf16)
    trainer, state = job.trainer, job.state
    steps = []
    for index in range(1 + args.steps + (args.profile is not None)):
        profile = index == 1 + args.steps
        with PeakMemory(args.device) as memory, _profiler(profile, args) as profiler:
            start = time.perf_counter()
            output = trainer.step(state)
            _sync()
            total = time.perf_counter() - start
        state.iteration += 1
        state.consumed_train_samples += args.prefixes
        if profile:
            _write_profile(profiler, args.profile, "ours")
            continue  # the profiled step is slower: not measured
        metrics = output.metrics
        seconds = {
            "generate": metrics.get("sip/time/rollout", 0.0),
            "judge": metrics.get("sip/time/rewrite", 0.0) + metrics.get("sip/time/judge", 0.0),
            "reference": metrics.get("sip/time/reference", 0.0),
            "forward_backward": metrics.get("sip/time/forward_backward", 0.0),
            "optimizer": metrics.get("sip/time/optimizer", 0.0),
            "ema": metrics.get("sip/time/reference_update", 0.0),
        }
        tokens = {
            "reference": _positions(metrics, "reference"),
            "forward_backward": _positions(metrics, "forward_backward"),
        }
        steps.append(
            {"total": total, "phases": seconds, "tokens": tokens, "peak_bytes": memory.bytes}
        )
    job.close()
    return {"steps": steps[1:]}


def _positions(metrics: dict, phase: str) -> float:
    rate = metrics.get(f"sip/tokens-per-second/{phase}", 0.0)
    return rate * metrics.get(f"sip/time/{phase}", 0.0)


def run_hf(args) -> dict:
    from megatron_sip.models.checkpointing import unwrap_model

    config, job = build_sip_job(args, args.corpus, bf16=False)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    policy = hf_model_from(
        config.model, unwrap_model(job.trainer.job.model_chunks[0]), args.vocab_size, dtype
    )
    stream = job.trainer.stream
    hf = HFStep(
        policy,
        config,
        args,
    )
    job.close()
    del job
    import gc

    gc.collect()
    steps = []
    for _ in range(1 + args.steps):
        samples = next(stream)
        with PeakMemory(args.device) as memory:
            start = time.perf_counter()
            seconds, info = hf.step(samples)
            _sync()
            total = time.perf_counter() - start
        tokens = {"reference": info["positions"], "forward_backward": info["positions"]}
        steps.append(
            {"total": total, "phases": seconds, "tokens": tokens, "peak_bytes": memory.bytes}
        )
    return {"steps": steps[1:]}


class _NoProfile:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _profiler(enabled: bool, args):
    if not enabled:
        return _NoProfile()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def _write_profile(profiler, directory: Path, name: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    trace = directory / f"{name}_step_trace.json"
    profiler.export_chrome_trace(str(trace))
    key = (
        "self_cuda_time_total"
        if any(e.device_type.name == "CUDA" for e in profiler.events())
        else "self_cpu_time_total"
    )
    table = profiler.key_averages().table(sort_by=key, row_limit=20)
    (directory / f"{name}_step_top.txt").write_text(table)
    print(f"profile of our step: {trace} (open in https://ui.perfetto.dev), top entries:")
    print(table)


# ---- the report -------------------------------------------------------------------------------


def median_step(result: dict) -> dict:
    steps = result["steps"]
    return {
        "total": statistics.median(s["total"] for s in steps),
        "phases": {p: statistics.median(s["phases"][p] for s in steps) for p in PHASES},
        "tokens": steps[0]["tokens"],
        "peak_bytes": max(s["peak_bytes"] for s in steps),
    }


def model_flops_per_token(args, context: int) -> float:
    """Forward FLOPs per token: 2 x the non-embedding weights, plus attention over ``context``
    positions (QK^T and AV)."""
    h, layers, ffn = args.hidden_size, args.num_layers, args.ffn_hidden_size
    kv = h * (args.num_query_groups or args.num_attention_heads) // args.num_attention_heads
    weights = layers * (2 * h * h + 2 * h * kv + 3 * h * ffn) + h * args.vocab_size
    return 2 * weights + 4 * layers * h * context


def phase_flops(args) -> dict:
    """Useful FLOPs per phase (the same work for both variants: padding is not useful)."""
    p, k, n, prefix = args.prefixes, args.num_rollouts, args.suffix_len, args.prefix_len
    generate = p * prefix * model_flops_per_token(args, prefix // 2)
    generate += p * k * n * model_flops_per_token(args, prefix + n // 2)
    candidate = model_flops_per_token(args, prefix + n // 2) * n
    prefix_flops = p * prefix * model_flops_per_token(args, prefix // 2)
    # Our reference scores chosen, rejected and one rollout; the policy chosen and rejected.
    return {
        "generate": generate,
        "reference": prefix_flops + p * 3 * candidate,
        "forward_backward": 3 * (prefix_flops + p * 2 * candidate),
    }


def peak_flops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
        if "H100" in name or "H200" in name:
            return 989e12 if args.bf16 else 67e12
    return None


def report(args, results: dict) -> dict:
    medians = {name: median_step(result) for name, result in results.items()}
    print(
        f"SIP step: {args.num_layers} layers, hidden {args.hidden_size}, heads "
        f"{args.num_attention_heads}, FFN {args.ffn_hidden_size}, vocab {args.vocab_size}; "
        f"{args.prefixes} prefixes x {args.prefix_len} tokens, K={args.num_rollouts} x "
        f"{args.suffix_len} tokens; {args.device} {'bf16' if args.bf16 else 'fp32'}, "
        f"{args.transformer_impl}; medians of {args.steps} steps after a warm-up"
    )
    header = f"{'phase (s)':<18}" + "".join(f"{name:>12}" for name in medians)
    if len(medians) == 2:
        header += f"{'hf / ours':>12}"
    print(header)
    for phase in (*PHASES, "total"):
        values = [m["total"] if phase == "total" else m["phases"][phase] for m in medians.values()]
        line = f"{phase:<18}" + "".join(f"{v:>12.3f}" for v in values)
        if len(values) == 2 and values[0] > 0:
            line += f"{values[1] / values[0]:>11.2f}x"
        print(line)
    new_tokens = args.prefixes * args.num_rollouts * args.suffix_len
    for name, m in medians.items():
        generate = m["phases"]["generate"]
        score = m["phases"]["reference"] + m["phases"]["forward_backward"]
        print(
            f"{name}: generation {new_tokens / generate:.0f} tokens/s; scoring "
            f"{(m['tokens']['reference'] + m['tokens']['forward_backward']) / score:.0f} "
            f"positions/s; peak memory {m['peak_bytes'] / 2**30:.2f} GiB"
        )
    peak = peak_flops(args)
    if peak is not None:
        flops = phase_flops(args)
        for name, m in medians.items():
            mfu = {p: f / m["phases"][p] / peak for p, f in flops.items() if m["phases"][p] > 0}
            print(f"{name} MFU: " + ", ".join(f"{p} {100 * v:.1f}%" for p, v in mfu.items()))
    summary = {}
    if {"ours", "hf"} <= set(medians):
        ours, hf = medians["ours"], medians["hf"]

        def score(m):
            return m["phases"]["reference"] + m["phases"]["forward_backward"]

        summary = {
            "step_speedup": round(hf["total"] / ours["total"], 3),
            "scoring_speedup": round(score(hf) / score(ours), 3),
            "generation_speedup": round(hf["phases"]["generate"] / ours["phases"]["generate"], 3),
            "peak_memory_ratio": round(hf["peak_bytes"] / max(ours["peak_bytes"], 1), 3),
            "hf_step_s": round(hf["total"], 3),
            "ours_step_s": round(ours["total"], 3),
        }
    else:
        name, only = next(iter(medians.items()))
        summary = {f"{name}_step_s": round(only["total"], 3)}
    return summary


def check_report(rows: list[dict]) -> bool:
    print(f"{'update':<8}{'ours loss':>14}{'hf loss':>14}{'ours margin':>14}{'hf margin':>14}")
    good = True
    for row in rows:
        print(
            f"{row['update']:<8}{row['ours_loss']:>14.7f}{row['hf_loss']:>14.7f}"
            f"{row['ours_margin']:>14.7f}{row['hf_margin']:>14.7f}"
        )
        for ours, hf in (
            (row["ours_loss"], row["hf_loss"]),
            (row["ours_margin"], row["hf_margin"]),
        ):
            good &= abs(ours - hf) <= 1e-4 + 1e-3 * abs(hf)
    return good


def child(argv: list[str], what: str, corpus: str) -> dict:
    """Runs ``what`` in a fresh process (its own memory, its own world of one)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        command = [sys.executable, __file__, *argv, "--run", what, "--corpus", corpus]
        subprocess.run([*command, "--result", result.name], check=True)
        return json.loads(Path(result.name).read_text())


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.run is not None:
        run = {"check": run_check, "ours": run_ours, "hf": run_hf}[args.run]
        Path(args.result).write_text(json.dumps(run(args)))
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - {"ours", "hf"}
    if unknown or not variants:
        raise SystemExit(f"--variants: choose from ours, hf (got {args.variants!r})")
    with tempfile.TemporaryDirectory() as directory:
        corpus = write_corpus(Path(directory), args)
        if not args.skip_check:
            print("check: two updates of both variants on one fixed batch, same initial weights")
            if not check_report(child(argv, "check", corpus)["rows"]):
                raise SystemExit("check failed: the two variants do not compute the same loss")
            print("check: same losses and margins")
        results = {name: child(argv, name, corpus) for name in variants}
    summary = report(args, results)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
