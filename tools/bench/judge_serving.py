"""Judge verdicts per second through tools/serve_judge.py: batched across requests vs one prompt
per call.

    python tools/bench/judge_serving.py                   # CPU: a small random judge, built here
    python tools/bench/judge_serving.py --device cuda     # GPU: a larger one
    python tools/bench/judge_serving.py --load CKPT       # any checkpoint (NullTokenizer prompts
                                                          # need --prompt-ids; others use words)

The server starts once, on one checkpoint; every request is a judge call (one greedy token,
``max_tokens=1``, ``logprobs=20``), on the same N prompts of --prompt-tokens tokens each:

  batched      --clients concurrent clients, each sending --prompts-per-request prompts a request
               until all N are judged: the scheduler gathers prompts of all queued requests into
               shared forward passes (--max-batch-prompts)
  sequential   one client, one prompt a request, one request at a time

Before timing, both modes run once on a few prompts, and afterwards the top-20 log-probabilities
of every prompt are compared across the modes (max_abs_logprob_difference: batching pads prompts,
which causal attention makes exact, so only float noise remains). Prints a table, then one JSON
object: batched_verdicts_per_s, sequential_verdicts_per_s and speedup (batched / sequential).
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

DEFAULTS = {
    "cpu": {"num_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "vocab_size": 4096,
            "prompt_tokens": 96, "prompts": 512},
    "cuda": {"num_layers": 8, "hidden_size": 1024, "num_attention_heads": 16,
             "vocab_size": 32768, "prompt_tokens": 512, "prompts": 2048},
}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--load", help="Checkpoint to serve (default: a random one built here).")
    parser.add_argument("--output-dir", help="Where the built checkpoint and the server log go.")
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--num-attention-heads", type=int)
    parser.add_argument("--vocab-size", type=int, help="Token ids of the built judge.")
    parser.add_argument("--prompt-tokens", type=int, help="Tokens per prompt.")
    parser.add_argument("--prompts", type=int, help="N: prompts judged in each mode.")
    parser.add_argument("--prompt-ids", action="store_true",
                        help="Prompts of integer ids (a NullTokenizer checkpoint; the default "
                        "for the built one); else words.")  # fmt: skip
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--prompts-per-request", type=int, default=4)
    parser.add_argument("--max-batch-prompts", type=int, default=64)
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.load is None:
        args.prompt_ids = True
    return args


def build_judge(directory: Path, args) -> Path:
    """A random Llama-style checkpoint with a NullTokenizer (ids 0..vocab-2, EOD vocab-1)."""
    from megatron_sip.data.config import TokenizerConfig, padded_vocab_size
    from megatron_sip.initialize import ParallelConfig, destroy_distributed, initialize_distributed
    from megatron_sip.models.checkpointing import model_metadata, save_checkpoint
    from megatron_sip.models.config import ModelConfig
    from megatron_sip.models.gpt import build_model

    seq_length = 2 * args.prompt_tokens
    model = ModelConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        ffn_hidden_size=4 * args.hidden_size, num_attention_heads=args.num_attention_heads,
        seq_length=seq_length, max_position_embeddings=seq_length,
        position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
        untie_embeddings_and_output_weights=True, disable_bias_linear=True, hidden_dropout=0.0,
        attention_dropout=0.0, transformer_impl="local",
    )  # fmt: skip
    tokenizer = TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=args.vocab_size - 1)
    context = initialize_distributed(ParallelConfig(), "cpu", 1234, environ={})
    chunks, _ = build_model(
        model, ParallelConfig(), padded_vocab_size(args.vocab_size, 128, 1), context.pg_collection
    )
    path = directory / "judge"
    save_checkpoint(str(path), 0, chunks, extra_common=model_metadata(model, tokenizer))
    destroy_distributed()
    return path


def make_prompts(args) -> list[str]:
    rng = random.Random(0)
    if args.prompt_ids:
        ids = range(args.vocab_size - 1)
        return [" ".join(str(rng.choice(ids)) for _ in range(args.prompt_tokens))
                for _ in range(args.prompts)]  # fmt: skip
    words = "the judge reads a verdict after the answer prompt and the quick brown fox".split()
    return [" ".join(rng.choice(words) for _ in range(args.prompt_tokens))
            for _ in range(args.prompts)]  # fmt: skip


class Server:
    """tools/serve_judge.py in a subprocess, its output in a log file."""

    def __init__(self, load: Path, args, log: Path):
        command = [sys.executable, str(ROOT / "tools" / "serve_judge.py"), "--load", str(load),
                   "--port", "0", "--device", args.device, "--model-name", "judge",
                   "--max-batch-prompts", str(args.max_batch_prompts),
                   "--max-prompts-per-request",
                   str(max(256, args.prompts_per_request))]  # fmt: skip
        self.log = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)  # fmt: skip
        self.ready: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        try:
            self.url = self.ready.get(timeout=600)
        except queue.Empty:
            self.stop()
            raise SystemExit(f"the server did not start; see {log}") from None

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.log.write(line)
            match = re.search(r"serving \S+ on (http://\S+)", line)
            if match:
                self.ready.put(match.group(1))

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(timeout=60)
        self.log.close()
        return code


def http_client(url: str):
    import httpx

    return httpx.Client(base_url=url, timeout=600)


def judge(client, prompts: list[str]) -> list[dict]:
    body = {"model": "judge", "prompt": prompts, "max_tokens": 1, "temperature": 0,
            "logprobs": 20}  # fmt: skip
    response = client.post("/v1/completions", json=body)
    response.raise_for_status()
    return [choice["logprobs"]["top_logprobs"][0] for choice in response.json()["choices"]]


def sequential(url: str, prompts: list[str]) -> tuple[float, list[dict]]:
    with http_client(url) as client:
        begun = time.perf_counter()
        tops = [judge(client, [prompt])[0] for prompt in prompts]
        return time.perf_counter() - begun, tops


def batched(url: str, prompts: list[str], clients: int, per_request: int):
    chunks: queue.Queue = queue.Queue()
    for start in range(0, len(prompts), per_request):
        chunks.put(start)
    tops: list = [None] * len(prompts)
    failures: list[BaseException] = []

    def client_loop() -> None:
        with http_client(url) as client:
            while True:
                try:
                    start = chunks.get_nowait()
                except queue.Empty:
                    return
                try:
                    tops[start : start + per_request] = judge(
                        client, prompts[start : start + per_request]
                    )
                except BaseException as error:  # noqa: BLE001 (reported below)
                    failures.append(error)
                    return

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    begun = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - begun
    if failures:
        raise failures[0]
    return seconds, tops


def max_difference(first: list[dict], second: list[dict]) -> float:
    worst = 0.0
    for a, b in zip(first, second):
        for text in a.keys() & b.keys():
            worst = max(worst, abs(a[text] - b[text]))
    return worst


def main(argv=None) -> int:
    args = parse_args(argv)
    directory = Path(args.output_dir or tempfile.mkdtemp(prefix="judge_serving_"))
    directory.mkdir(parents=True, exist_ok=True)
    load = Path(args.load) if args.load else build_judge(directory, args)
    prompts = make_prompts(args)
    server = Server(load, args, directory / "server.log")
    try:
        warm = prompts[: max(8, args.prompts_per_request)]
        sequential(server.url, warm[:4])
        batched(server.url, warm, args.clients, args.prompts_per_request)
        batched_s, batched_tops = batched(
            server.url, prompts, args.clients, args.prompts_per_request
        )
        sequential_s, sequential_tops = sequential(server.url, prompts)
    finally:
        exit_code = server.stop()
    result = {
        "device": args.device,
        "model": None if args.load else {
            "num_layers": args.num_layers, "hidden_size": args.hidden_size,
            "num_attention_heads": args.num_attention_heads, "vocab_size": args.vocab_size,
        },
        "load": str(load),
        "prompts": len(prompts),
        "prompt_tokens": args.prompt_tokens,
        "clients": args.clients,
        "prompts_per_request": args.prompts_per_request,
        "max_batch_prompts": args.max_batch_prompts,
        "batched_seconds": round(batched_s, 3),
        "sequential_seconds": round(sequential_s, 3),
        "batched_verdicts_per_s": round(len(prompts) / batched_s, 2),
        "sequential_verdicts_per_s": round(len(prompts) / sequential_s, 2),
        "speedup": round(sequential_s / batched_s, 2),
        "max_abs_logprob_difference": max_difference(batched_tops, sequential_tops),
        "server_exit_code": exit_code,
    }  # fmt: skip
    print(f"{'mode':<12} {'seconds':>9} {'verdicts/s':>11}")
    for mode in ("batched", "sequential"):
        print(f"{mode:<12} {result[mode + '_seconds']:>9.3f} "
              f"{result[mode + '_verdicts_per_s']:>11.2f}")  # fmt: skip
    print(
        f"speedup {result['speedup']:.2f}x; max |logprob difference| "
        f"{result['max_abs_logprob_difference']:.2g}; server log {directory / 'server.log'}"
    )
    print(json.dumps(result), flush=True)
    return 0 if exit_code == 0 and result["max_abs_logprob_difference"] < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
