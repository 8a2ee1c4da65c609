"""Forward + backward of the batched DPO log-ratio op against the naive torch version.

    python tools/bench/bench_dpo_logratio.py --device cpu     # S=36, T=128, V=32000, fp32
    python tools/bench/bench_dpo_logratio.py --device cuda    # S=288, T=128, V=128256, bf16

One DPO step's log-prob work: the policy's logits [S, T, V] (with grad) and the reference's (no
grad) -> masked per-sequence target log-prob sums -> DPO loss over S/2 (chosen, rejected) pairs
-> backward into the policy's logits. Variants, all in this run on the same inputs:

  naive     log_softmax + gather + sums in fp32 (what a straightforward loss does)
  compiled  torch.compile of naive (GPU only)
  liger     Liger-Kernel's cross entropy (reduction="none", masked tokens as ignore_index; it
            writes the gradient into the logits in the forward pass), GPU only, where importable
  ours      megatron_sip.ops.dpo (the C++ or CUDA kernel)

Before timing, every variant runs once on a fresh copy of the inputs and its loss and policy
gradient are compared with naive's (printed, and in the JSON as loss_error and grad_error).

Time: the median of --repeats runs after --warmup. Peak memory above the inputs: on GPU
torch.cuda.max_memory_allocated; on CPU each variant runs once in a fresh process and reports
its peak resident memory (VmHWM, reset just before the step) minus its resident memory then. On
GPU the
device's copy bandwidth is measured too and ours is reported as a fraction of it (it reads the
policy logits twice, the reference logits once and writes the gradient once). The last line is
one JSON object: speedup (naive time / ours), peak_memory_ratio (naive / ours), and on GPU
bandwidth_fraction and whether ours beat every other variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_sip.ops import dpo  # noqa: E402

DEFAULTS = {
    "cpu": {"sequences": 36, "tokens": 128, "vocab": 32000, "dtype": "float32"},
    "cuda": {"sequences": 288, "tokens": 128, "vocab": 128256, "dtype": "bfloat16"},
}


def make_inputs(args, device):
    generator = torch.Generator(device="cpu").manual_seed(0)
    dtype = getattr(torch, args.dtype)
    shape = (args.sequences, args.tokens, args.vocab)
    policy = (torch.randn(shape, generator=generator) * 2).to(device=device, dtype=dtype)
    reference = (policy.float() + 0.1 * torch.randn(shape, generator=generator).to(device)).to(
        dtype
    )
    targets = torch.randint(0, args.vocab, shape[:2], generator=generator).to(device)
    mask = (torch.rand(shape[:2], generator=generator) > 0.1).float().to(device)
    return policy.requires_grad_(), reference, targets, mask


def dpo_backward(sequence_sums, policy, reference, beta):
    """The DPO loss over (even, odd) sequence pairs from per-sequence log-prob sums, backward."""
    with torch.no_grad():
        ref = sequence_sums(reference)
    lp = sequence_sums(policy)
    margins = (lp[0::2] - ref[0::2]) - (lp[1::2] - ref[1::2])
    loss = -torch.nn.functional.logsigmoid(beta * margins).sum()
    loss.backward()
    return loss


def naive_step(policy, reference, targets, mask, beta=0.1):
    def sums(logits):
        token = logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        return (token * mask).sum(-1)

    return dpo_backward(sums, policy, reference, beta)


def ours_step(policy, reference, targets, mask, beta=0.1):
    with torch.no_grad():
        ref = dpo.sequence_log_probs(dpo.target_log_probs(reference, targets), mask)
    lp = dpo.sequence_log_probs(dpo.target_log_probs(policy, targets), mask)
    pairs = torch.arange(0, lp.shape[0], 2, device=lp.device)
    out = dpo.dpo_log_ratios(lp, ref, pairs, pairs + 1, beta)
    loss = out.loss.sum()
    loss.backward()
    return loss


IGNORE_INDEX = -100


def cross_entropy_step(cross_entropy):
    """The DPO step with per-token log-probs from ``cross_entropy(logits2d, targets1d,
    ignore_index=, reduction="none")`` (Liger-Kernel's, or torch's in the tests)."""

    def step(policy, reference, targets, mask, beta=0.1):
        vocab = policy.shape[-1]
        flat_targets = targets.masked_fill(mask == 0, IGNORE_INDEX).reshape(-1)

        def sums(logits):
            token = -cross_entropy(
                logits.reshape(-1, vocab), flat_targets, ignore_index=IGNORE_INDEX, reduction="none"
            )
            return (token.float().view(mask.shape) * mask).sum(-1)

        return dpo_backward(sums, policy, reference, beta)

    return step


def liger_cross_entropy():
    """Liger-Kernel's functional cross entropy, or None where it is not installed."""
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy as function
    except ImportError:
        return None
    return function


def variants(device):
    found = {"naive": naive_step}
    if device == "cuda":
        found["compiled"] = torch.compile(naive_step)
        liger = liger_cross_entropy()
        if liger is not None:
            found["liger"] = cross_entropy_step(liger)
        else:
            print("liger: not measured (liger_kernel is not importable)", flush=True)
    found["ours"] = ours_step
    return found


def check_against_naive(steps, inputs):
    """Runs each variant once on a fresh copy of the policy logits (Liger overwrites them) and
    returns {name: (max |loss - naive's|, max |grad - naive's| / max |naive's grad|)}."""

    def run(step):
        policy = inputs[0].detach().clone().requires_grad_()
        loss = step(policy, *inputs[1:])
        return loss.detach().float(), policy.grad

    naive_loss, naive_grad = run(steps["naive"])
    scale = naive_grad.float().abs().max().clamp_min(1e-30)
    errors = {}
    for name, step in steps.items():
        if name == "naive":
            continue
        loss, grad = run(step)
        grad_error = (grad.float() - naive_grad.float()).abs().max() / scale
        errors[name] = ((loss - naive_loss).abs().item(), grad_error.item())
        del grad
    return errors


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_variant(step, inputs, device, warmup, repeats):
    policy = inputs[0]
    for _ in range(warmup):
        policy.grad = None
        step(*inputs)
    sync(device)
    times = []
    for _ in range(repeats):
        policy.grad = None
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(*inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            step(*inputs)
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def measure(step, inputs, args, name) -> dict:
    """Median seconds of ``step`` and its peak memory above the inputs."""
    device = args.device
    seconds = time_variant(step, inputs, device, args.warmup, args.repeats)
    if device == "cuda":
        inputs[0].grad = None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(*inputs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = cpu_peak_memory(args, name)
    return {"seconds": seconds, "peak_bytes": peak}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def cpu_peak_memory(args, name) -> int:
    """Runs one step of ``name`` in a fresh process; its peak RSS above the RSS before it."""
    command = [sys.executable, __file__, "--device", "cpu", "--memory-child", name]
    for key in ("sequences", "tokens", "vocab", "dtype"):
        command += [f"--{key}", str(getattr(args, key))]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def memory_child(args) -> None:
    inputs = make_inputs(args, "cpu")
    # Warm the allocator and library code paths on a tiny problem first.
    small = argparse.Namespace(**{**vars(args), "sequences": 2, "tokens": 2})
    variants("cpu")[args.memory_child](*make_inputs(small, "cpu"))
    _reset_peak_rss()
    before = _status_bytes("VmRSS")
    variants("cpu")[args.memory_child](*inputs)
    print(max(0, _status_bytes("VmHWM") - before))


def copy_bandwidth(device) -> float:
    """Bytes per second of a device-to-device copy (read + write)."""
    source = torch.empty(512 * 1024 * 1024, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    sync(device)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * source.numel() / statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sequences", type=int)
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--check-sequences",
        type=int,
        default=16,
        help="sequences (an even number) on which each variant is compared with naive",
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.memory_child:
        memory_child(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    device = args.device
    implementation = "cuda" if device == "cuda" else "cpu"
    if dpo.kernel_module(implementation) is None:
        raise SystemExit(f"{dpo._MODULES[implementation]} is not built: make install")
    inputs = make_inputs(args, device)
    element = torch.finfo(getattr(torch, args.dtype)).bits // 8
    logits_bytes = args.sequences * args.tokens * args.vocab * element
    print(
        f"S={args.sequences} T={args.tokens} V={args.vocab} {args.dtype} on {device} "
        f"({torch.get_num_threads()} threads): logits {logits_bytes / 2**20:.0f} MiB each",
        flush=True,
    )
    steps = variants(device)
    # A pair-aligned slice keeps the check's extra copies small next to the timed runs.
    check_inputs = tuple(tensor[: args.check_sequences] for tensor in inputs)
    errors = check_against_naive(steps, check_inputs)
    for name, (loss_error, grad_error) in errors.items():
        print(
            f"{name:>9}: |loss - naive| {loss_error:.3g}, max |grad - naive| / max |grad| "
            f"{grad_error:.3g} (first {args.check_sequences} sequences)",
            flush=True,
        )
    results = {}
    for name, step in steps.items():
        variant_inputs = inputs
        if name == "liger":
            # Liger writes its gradient into the policy logits: time it on a copy of them.
            variant_inputs = (inputs[0].detach().clone().requires_grad_(), *inputs[1:])
        try:
            results[name] = measure(step, variant_inputs, args, name)
        except torch.OutOfMemoryError:
            # The naive variants may not fit where ours does (an H100 at the default sizes).
            results[name] = {"seconds": None, "peak_bytes": None, "error": "out of memory"}
            print(f"{name:>9}: out of memory", flush=True)
        finally:
            inputs[0].grad = None
            del variant_inputs
            if device == "cuda":
                torch.cuda.empty_cache()
        if name in errors:
            results[name]["loss_error"], results[name]["grad_error"] = errors[name]
        if results[name]["seconds"] is not None:
            print(
                f"{name:>9}: {results[name]['seconds'] * 1000:9.1f} ms  "
                f"peak +{results[name]['peak_bytes'] / 2**20:8.1f} MiB",
                flush=True,
            )
    ours, naive = results["ours"], results["naive"]
    if ours["seconds"] is None:
        raise SystemExit("ours ran out of memory: use smaller --sequences")
    fits = naive["seconds"] is not None
    summary = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "sizes": {k: getattr(args, k) for k in ("sequences", "tokens", "vocab", "dtype")},
        # null where naive ran out of memory: there is no time to compare with.
        "speedup": naive["seconds"] / ours["seconds"] if fits else None,
        "peak_memory_ratio": naive["peak_bytes"] / max(ours["peak_bytes"], 1) if fits else None,
        "results": results,
    }
    if device == "cuda":
        bandwidth = copy_bandwidth(device)
        achieved = 4 * logits_bytes / ours["seconds"]
        summary["copy_bandwidth_gbs"] = bandwidth / 1e9
        summary["bandwidth_fraction"] = achieved / bandwidth
        # A variant that ran out of memory counts as slower.
        summary["fastest"] = all(
            r["seconds"] is None or ours["seconds"] <= r["seconds"]
            for n, r in results.items()
            if n != "ours"
        )
        print(
            f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; ours moves {4 * logits_bytes / 2**30:.2f}"
            f" GiB at {achieved / 1e9:.0f} GB/s = {summary['bandwidth_fraction']:.2f}",
            flush=True,
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
