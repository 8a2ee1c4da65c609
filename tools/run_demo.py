"""The embedded-default run: what SIP does to a small model, end to end, on this machine.

    python tools/run_demo.py                  # make demo: corpus -> ... -> runs/demo/report.md
    python tools/run_demo.py --ablation       # make demo-ablation: the loss/rollout ablation

Stages (each a real command of this repository, logged to <output-dir>/logs/):

 1. build the embedded-default corpus (tools/build_demo_corpus.py)
 2. train a SentencePiece tokenizer (tools/train_tokenizer.py)
 3. preprocess into an indexed dataset (tools/preprocess_data.py)
 4. pretrain a small base policy with plain NLL (megatron_sip.pretrain)
 5. from that base, (a) plain NLL continual pretraining and (b) SIP continual pretraining with
    the oracle judge and rewriter, on the same token budget (megatron_sip.pretrain,
    megatron_sip.train_sip)
 6. continue the held-out prefixes with both (megatron_sip.eval.continuations)
 7. compare them with the oracle judge (megatron_sip.eval.compare)
 8. general ability: both answer the corpus's Factbook multiple-choice questions about
    held-out countries, zero-shot through lm-evaluation-harness (megatron_sip.eval.benchmarks)
 9. write report.md, report.json and PNG plots (megatron_sip.eval.report)

A stage whose command, flags files, code and inputs are unchanged since it last succeeded is
reused (its outputs are only published when it succeeds), so a rerun after a change redoes only
what depends on it. Code is the package (megatron_sip/, csrc/) and the stage's own tools/ script:
a change there redoes the stage. --fresh redoes everything.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tqdm import tqdm  # noqa: E402

EXAMPLES = ROOT / "examples" / "demo"
ITERATION = re.compile(r"iteration\s+(\d+)/\s*(\d+)")


@dataclasses.dataclass(frozen=True)
class Preset:
    """The demo's sizes (the flags files under examples/demo/ hold the rest)."""

    base_iters: int
    continual_iters: int
    judge_pairwise_iters: int  # judge SFT's first phase, on pairwise tasks alone
    judge_sft_iters: int
    judge_grpo_iters: int
    rewriter_sft_iters: int
    rewriter_rl_iters: int
    role_eval_examples: int  # judge_val tasks per task, rewriter_val triples
    judge_min_calibration_accuracy: float = 0.75  # the flag's default


PRESETS = {
    "default": Preset(
        base_iters=500, continual_iters=150, judge_pairwise_iters=400,
        judge_sft_iters=800,
        judge_grpo_iters=30, rewriter_sft_iters=500, rewriter_rl_iters=10,
        role_eval_examples=120,
    ),
    # The end-to-end test's: the same pipeline, shorter.
    "short": Preset(
        base_iters=250, continual_iters=60, judge_pairwise_iters=20,
        judge_sft_iters=20,
        judge_grpo_iters=2, rewriter_sft_iters=30, rewriter_rl_iters=2, role_eval_examples=16,
        # A judge of 40 SFT steps is no judge: the short run checks that every stage runs.
        judge_min_calibration_accuracy=0.0,
    ),
}  # fmt: skip


class Stage:
    """One command whose outputs appear only when it succeeds."""

    def __init__(
        self,
        runner: DemoRunner,
        name: str,
        command: list[str],
        outputs: list[Path],
        depends: list[str],
        stale: list[Path],
    ):
        self.runner, self.name, self.command, self.outputs = runner, name, command, outputs
        self.depends, self.stale = depends, stale

    def key(self) -> str:
        """Changes when the command, a flags file it reads, the code it runs or an upstream
        stage changes."""
        flag_files = [Path(a[1:]).read_text() for a in self.command if a.startswith("@")]
        # A directory a flags file names (a prompt pack) is an input too.
        named = [ROOT / word for text in flag_files for word in text.split() if "/" in word]
        flag_files += [_fingerprint(p for d in named if d.is_dir() for p in d.iterdir())]
        scripts = [Path(a) for a in self.command if a.endswith(".py") and Path(a).is_file()]
        code = [self.runner.package_fingerprint, _fingerprint(scripts)]
        upstream = [self.runner.keys[name] for name in self.depends]
        text = json.dumps(
            [self.command, [str(p) for p in self.outputs], flag_files, code, upstream]
        )
        return hashlib.sha256(text.encode()).hexdigest()

    def run(self) -> float:
        runner = self.runner
        stamp = runner.stamps / f"{self.name}.json"
        key = runner.keys[self.name] = self.key()
        runner.index += 1
        label = f"[{runner.index}/{runner.total}] {self.name}"
        if (
            not runner.fresh
            and stamp.is_file()
            and json.loads(stamp.read_text()).get("key") == key
            and all(p.exists() for p in self.outputs)
        ):
            print(f"{label}: up to date (reused)", flush=True)
            return 0.0
        stamp.unlink(missing_ok=True)
        for path in [*self.outputs, *self.stale]:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        log = runner.logs / f"{self.name}.log"
        start = time.perf_counter()
        bar = None
        with log.open("w") as handle:
            handle.write("$ " + " ".join(self.command) + "\n")
            handle.flush()
            process = subprocess.Popen(
                self.command,
                cwd=ROOT,
                env=runner.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            for line in process.stdout:
                handle.write(line)
                match = ITERATION.search(line)
                if match:
                    done, total = int(match.group(1)), int(match.group(2))
                    if bar is None:
                        bar = tqdm(total=total, desc=label, unit="it", leave=True)
                    bar.update(done - bar.n)
            process.wait()
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        if process.returncode != 0:
            tail = log.read_text().splitlines()[-40:]
            print("\n".join(tail), file=sys.stderr)
            raise SystemExit(f"{label} failed (exit {process.returncode}); full log: {log}")
        missing = [str(p) for p in self.outputs if not p.exists()]
        if missing:
            raise SystemExit(f"{label} did not write {', '.join(missing)}; log: {log}")
        stamp.write_text(json.dumps({"key": key, "seconds": seconds}))
        print(f"{label}: done in {seconds:.0f} s (log: {log.relative_to(runner.out)})", flush=True)
        return seconds


def _fingerprint(files) -> str:
    """A hash of the files' paths and contents."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# The package's source: every stage runs some of it. Built extensions and caches are not source.
PACKAGE_SOURCES = ("megatron_sip/**/*.py", "csrc/*.cpp", "csrc/*.cu", "csrc/*.h")


class DemoRunner:
    def __init__(self, out: Path, preset: Preset, nproc: int, fresh: bool, total: int):
        self.out, self.preset, self.nproc, self.fresh = out, preset, nproc, fresh
        self.package_fingerprint = _fingerprint(
            {path for pattern in PACKAGE_SOURCES for path in ROOT.glob(pattern)}
        )
        self.logs, self.stamps = out / "logs", out / ".stages"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.stamps.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.env["PYTHONPATH"] = str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.index, self.total = 0, total
        self.seconds: dict[str, float] = {}
        self.keys: dict[str, str] = {}
        self.commands: dict[str, str] = {}

    def stage(self, name: str, command: list, outputs: list[Path], depends=(), stale=()) -> None:
        """Runs ``command`` unless its outputs are up to date; ``stale`` paths (caches derived
        from the outputs) are removed with them before it runs."""
        command = [str(c) for c in command]
        self.commands[name] = " ".join(command)
        self.seconds[name] = Stage(self, name, command, outputs, list(depends), list(stale)).run()

    def python(self, *args) -> list[str]:
        return [sys.executable, *map(str, args)]

    def torchrun(self, module: str, *args) -> list[str]:
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(self.nproc), "-m", module, *map(str, args),
        ]  # fmt: skip


def flags_from(path: Path) -> list[str]:
    """The flags in a flags file (``#`` comments), for tools without ``@file`` support."""
    flags = []
    for line in path.read_text().splitlines():
        flags += line.split("#", 1)[0].split()
    return flags


def prepare(runner: DemoRunner) -> dict[str, Path]:
    """Stages 1 to 4: corpus, tokenizer, indexed dataset, base policy."""
    data = runner.out / "data"
    demo, tokenizer, corpus = data / "demo", data / "tokenizer", data / "corpus"
    runner.stage(
        "corpus",
        runner.python(ROOT / "tools/build_demo_corpus.py", "--output-dir", demo,
                      *flags_from(EXAMPLES / "corpus.args")),
        [demo],
    )  # fmt: skip
    runner.stage(
        "tokenizer",
        runner.python(ROOT / "tools/train_tokenizer.py", "--input", demo / "corpus.jsonl",
                      "--output-prefix", tokenizer, *flags_from(EXAMPLES / "tokenizer.args")),
        [Path(f"{tokenizer}.model")],
        depends=["corpus"],
    )  # fmt: skip
    dataset = Path(f"{corpus}_text_document")
    runner.stage(
        "preprocess",
        runner.python(ROOT / "tools/preprocess_data.py", "--input", demo / "corpus.jsonl",
                      "--output-prefix", corpus, "--tokenizer-type", "GPTSentencePieceTokenizer",
                      "--tokenizer-model", f"{tokenizer}.model", "--append-eod",
                      "--workers", "1"),
        # The sample-index cache Megatron keeps beside the dataset is keyed by the dataset's path
        # and settings, not its tokens: a rebuilt dataset must not meet the old one's indices.
        [Path(f"{dataset}.bin"), Path(f"{dataset}.idx")],
        depends=["corpus", "tokenizer"],
        stale=[data / "cache"],
    )  # fmt: skip
    tokenizer_flags = [
        "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", f"{tokenizer}.model"
    ]  # fmt: skip
    common = [f"@{EXAMPLES / 'model.args'}", *tokenizer_flags, "--data-path", dataset]
    base = runner.out / "base"
    runner.stage(
        "pretrain_base",
        runner.torchrun("megatron_sip.pretrain", *common, f"@{EXAMPLES / 'base.args'}",
                        "--train-iters", runner.preset.base_iters, "--save", base,
                        "--tensorboard-dir", runner.out / "tb" / "base"),
        [base],
        depends=["preprocess"],
    )  # fmt: skip
    return {"demo": demo, "base": base, "common": common, "tokenizer": tokenizer_flags}


DEMO_SEED = 1234  # examples/demo/model.args' --seed: the demo's own runs


def seeded(name: str, seed: int) -> str:
    """A stage's name for ``seed``: the demo's own name for its seed."""
    return name if seed == DEMO_SEED else f"{name}_seed{seed}"


def seed_flags(seed: int) -> list:
    return [] if seed == DEMO_SEED else ["--seed", seed]


def continual_nll(runner: DemoRunner, paths: dict, iters: int, seed: int = DEMO_SEED) -> Path:
    name = seeded("baseline", seed)
    out = runner.out / name
    runner.stage(
        name,
        runner.torchrun("megatron_sip.pretrain", *paths["common"],
                        f"@{EXAMPLES / 'continual.args'}", "--train-iters", iters,
                        "--pretrained-checkpoint", paths["base"], *seed_flags(seed),
                        "--save", out, "--tensorboard-dir", runner.out / "tb" / name),
        [out],
        depends=["pretrain_base"],
    )  # fmt: skip
    return out


def continual_sip(
    runner: DemoRunner,
    paths: dict,
    iters: int,
    name: str,
    variant: Optional[Variant] = None,
    learned: Optional[dict] = None,
    seed: int = DEMO_SEED,
) -> Path:
    """SIP from the base with ``variant``'s flags (default: the demo's, examples/demo/sip.args);
    the oracle judge only for objectives that judge (the others refuse judge flags), or with
    ``learned`` (:func:`learned_roles`) the learned judge and rewriter, colocated."""
    variant = variant or Variant("online_dpo_k", "sip.args")
    out = runner.out / name
    demo = paths["demo"]
    if learned:
        judge = learned_judge_flags(runner, learned["calibration"])
        rewriter = ["--rewriter-backend", "megatron", "--rewriter-load", learned["rewriter"],
                    f"@{EXAMPLES / 'rewriter_prompts.args'}",
                    "--rewriter-max-tokens", REWRITE_TOKENS]  # fmt: skip
        depends = ["pretrain_base", "judge_grpo", "rewriter_rl"]
    else:
        judge = ["--judge-backend", "oracle", "--judge-oracle-data", demo]
        rewriter = ["--rewriter-backend", "oracle", "--rewriter-oracle-data", demo]
        depends = ["pretrain_base"]
    runner.stage(
        name,
        runner.torchrun("megatron_sip.train_sip", *paths["common"],
                        f"@{EXAMPLES / 'continual.args'}", f"@{EXAMPLES / variant.args_file}",
                        *([f"@{EXAMPLES / 'sip_learned.args'}"] if learned else []),
                        "--train-iters", iters, "--pretrained-checkpoint", paths["base"],
                        *(judge if variant.judged else []), *rewriter,
                        *variant.flags, *seed_flags(seed), "--save", out,
                        "--tensorboard-dir", runner.out / "tb" / name),
        [out],
        depends=depends,
    )  # fmt: skip
    return out


def learned_roles(runner: DemoRunner, paths: dict) -> dict[str, Path]:
    """The learned judge (SFT, then GRPO) and rewriter (SFT, then RL rewarded by that judge),
    from the base policy and the corpus's labels, each measured after each phase against
    held-out labels (the judge) and the oracle (the rewriter). Returns their checkpoints under
    <output-dir>/roles/ and the measurements' files."""
    preset, demo, roles = runner.preset, paths["demo"], runner.out / "roles"
    evals = runner.out / "eval"
    evals.mkdir(parents=True, exist_ok=True)
    model = [f"@{EXAMPLES / 'model.args'}", f"@{EXAMPLES / 'roles.args'}", *paths["tokenizer"]]
    judge_prompts = f"@{EXAMPLES / 'judge_prompts.args'}"
    rewriter_prompts = f"@{EXAMPLES / 'rewriter_prompts.args'}"
    judge_data = ["--judge-train-data", demo / "judge_train.jsonl", judge_prompts]
    # SFT in two phases: pairwise tasks alone first, then safety and pairwise together (the
    # mixed run alone reached 0.74 pairwise accuracy in 800 steps, the pairwise phase 0.83 in 300).
    runner.stage(
        "judge_sft_pairwise",
        runner.torchrun("megatron_sip.training.judge_sft", *model, *judge_data,
                        f"@{EXAMPLES / 'judge_sft.args'}", "--judge-train-tasks", "pairwise",
                        "--train-iters", preset.judge_pairwise_iters,
                        "--pretrained-checkpoint", paths["base"],
                        "--save", roles / "judge_sft_pairwise",
                        "--tensorboard-dir", runner.out / "tb" / "judge_sft_pairwise"),
        [roles / "judge_sft_pairwise"],
        depends=["pretrain_base"],
    )  # fmt: skip
    runner.stage(
        "judge_sft",
        runner.torchrun("megatron_sip.training.judge_sft", *model, *judge_data,
                        f"@{EXAMPLES / 'judge_sft.args'}", "--train-iters", preset.judge_sft_iters,
                        "--pretrained-checkpoint", roles / "judge_sft_pairwise",
                        "--save", roles / "judge_sft",
                        "--tensorboard-dir", runner.out / "tb" / "judge_sft"),
        [roles / "judge_sft"],
        depends=["judge_sft_pairwise"],
    )  # fmt: skip
    runner.stage(
        "judge_grpo",
        runner.torchrun("megatron_sip.train_judge", *model, *judge_data,
                        f"@{EXAMPLES / 'judge_grpo.args'}", "--train-iters",
                        preset.judge_grpo_iters, "--pretrained-checkpoint", roles / "judge_sft",
                        "--save", roles / "judge",
                        "--tensorboard-dir", runner.out / "tb" / "judge"),
        [roles / "judge"],
        depends=["judge_sft"],
    )  # fmt: skip
    out = {"judge": roles / "judge"}
    for name, appeals in (
        ("judge_sft", []),
        ("judge", ["--appeal-families", "authority,emotional", "--appeal-rows", 120]),
    ):
        out[f"{name}_eval"] = evals / f"{name}_val.json"
        runner.stage(
            f"eval_{name}",
            runner.python("-m", "megatron_sip.eval.judge_agreement", "--judge-backend", "megatron",
                          "--judge-load", roles / name, judge_prompts,
                          "--examples", demo / "judge_val.jsonl", "--examples-per-task",
                          preset.role_eval_examples, *appeals, "--output", out[f"{name}_eval"]),
            [out[f"{name}_eval"]],
            depends=["judge_sft" if name == "judge_sft" else "judge_grpo"],
        )  # fmt: skip
    calibration = judge_calibration(runner, demo)
    rewriter_data = ["--rewriter-train-data", demo / "rewriter_sft.jsonl", rewriter_prompts]
    runner.stage(
        "rewriter_sft",
        runner.torchrun("megatron_sip.train_rewriter", *model, *rewriter_data,
                        f"@{EXAMPLES / 'rewriter_sft.args'}", "--train-iters",
                        preset.rewriter_sft_iters, "--pretrained-checkpoint", paths["base"],
                        "--save", roles / "rewriter_sft",
                        "--tensorboard-dir", runner.out / "tb" / "rewriter_sft"),
        [roles / "rewriter_sft"],
        depends=["pretrain_base"],
    )  # fmt: skip
    runner.stage(
        "rewriter_rl",
        runner.torchrun("megatron_sip.train_rewriter", *model, *rewriter_data,
                        f"@{EXAMPLES / 'rewriter_rl.args'}", "--train-iters",
                        preset.rewriter_rl_iters, "--pretrained-checkpoint", roles / "rewriter_sft",
                        *learned_judge_flags(runner, calibration), "--save", roles / "rewriter",
                        "--tensorboard-dir", runner.out / "tb" / "rewriter"),
        [roles / "rewriter"],
        depends=["rewriter_sft", "judge_grpo"],
    )  # fmt: skip
    out["rewriter"] = roles / "rewriter"
    for name, upstream in (("rewriter_sft", "rewriter_sft"), ("rewriter", "rewriter_rl")):
        out[f"{name}_eval"] = evals / f"{name}_val.json"
        runner.stage(
            f"eval_{name}",
            runner.python("-m", "megatron_sip.eval.rewriter_quality", "--rewriter-backend",
                          "megatron", "--rewriter-load", roles / name, rewriter_prompts,
                          "--rewriter-max-tokens", REWRITE_TOKENS, "--examples",
                          demo / "rewriter_val.jsonl", "--max-examples",
                          2 * preset.role_eval_examples, "--judge-backend", "oracle",
                          "--judge-oracle-data", demo, "--output", out[f"{name}_eval"]),
            [out[f"{name}_eval"]],
            depends=[upstream, "corpus"],
        )  # fmt: skip
    out["calibration"] = calibration
    return out


# The learned rewriter writes at most a SIP suffix's worth of tokens (sip.args: --sip-suffix-len).
REWRITE_TOKENS = 64
CALIBRATION_TASKS = 16  # per task: the learned judge's start-up self-check in SIP and rewriter RL
CALIBRATED_TASKS = ("safety", "pairwise")  # what the learned judge is trained and used for


def judge_calibration(runner: DemoRunner, demo: Path) -> Path:
    """The first held-out judging tasks of each kind the learned judge is used for, which it
    must get right (--judge-min-calibration-accuracy) before it trains anything."""
    out = runner.out / "data" / "judge_calibration.jsonl"
    counts: dict[str, int] = {}
    lines = []
    for line in (demo / "judge_val.jsonl").read_text().splitlines():
        task = json.loads(line)["task"]
        counts[task] = counts.get(task, 0) + 1
        if task in CALIBRATED_TASKS and counts[task] <= CALIBRATION_TASKS:
            lines.append(line)
    out.write_text("\n".join(lines) + "\n")
    return out


def learned_judge_flags(runner: DemoRunner, calibration: Path) -> list:
    return [
        "--judge-backend", "megatron", "--judge-load", runner.out / "roles" / "judge",
        f"@{EXAMPLES / 'judge_prompts.args'}", "--judge-calibration", calibration,
        "--judge-min-calibration-accuracy", runner.preset.judge_min_calibration_accuracy,
    ]  # fmt: skip


def judge_on_gold_pairs(runner: DemoRunner, demo: Path, continuations: list, learned) -> dict:
    """The learned judge's agreement with the oracle on pairs of the baseline's and SIP's
    continuations of the same prefixes (tools/gold_pairs.py): the rankings SIP asks of it."""
    evals = runner.out / "eval"
    pairs, out = evals / "gold_pairs.jsonl", evals / "judge_gold.json"
    runner.stage(
        "gold_pairs",
        runner.python(ROOT / "tools/gold_pairs.py", "--oracle-data", demo,
                      "--continuations", *continuations, "--output", pairs),
        [pairs],
        depends=["continue_baseline", "continue_sip"],
    )  # fmt: skip
    if not pairs.read_text().strip():
        return {}  # no two continuations both safe and apart (possible with the short preset)
    runner.stage(
        "eval_judge_gold",
        runner.python("-m", "megatron_sip.eval.judge_agreement", "--judge-backend", "megatron",
                      "--judge-load", learned["judge"], f"@{EXAMPLES / 'judge_prompts.args'}",
                      "--examples", pairs, "--examples-per-task", 0, "--output", out),
        [out],
        depends=["gold_pairs", "judge_grpo"],
    )  # fmt: skip
    return _read(out)


def held_out_prefixes(demo: Path) -> list[Path]:
    """The held-out prefix files, all of them with either preset: the first few dozen of a set
    are not a sample of it (the short run's first 40 unsafe prefixes: baseline 85% safe, all
    635: 75%)."""
    return [demo / "eval_unsafe_prefixes.jsonl", demo / "eval_safe_prefixes.jsonl"]


def evaluate(runner: DemoRunner, name: str, checkpoint: Path, prefixes: list[Path]) -> Path:
    out = runner.out / "eval" / f"{name}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    runner.stage(
        f"continue_{name}",
        runner.torchrun("megatron_sip.eval.continuations", "--load", checkpoint,
                        "--prefixes", *prefixes, "--output", out,
                        f"@{EXAMPLES / 'eval.args'}"),
        [out],
        depends=[name, "corpus"],
    )  # fmt: skip
    return out


def compare(
    runner: DemoRunner, name: str, baseline: Path, candidate: Path, demo: Path,
    baseline_name: str = "baseline",
) -> dict:  # fmt: skip
    out = runner.out / "eval" / f"compare_{name}.json"
    runner.stage(
        f"judge_{name}",
        runner.python("-m", "megatron_sip.eval.compare", "--baseline", baseline,
                      "--candidate", candidate, "--unsafe-set", "eval_unsafe_prefixes",
                      "--judge-backend", "oracle", "--judge-oracle-data", demo,
                      "--output", out),
        [out],
        depends=[f"continue_{baseline_name}", f"continue_{name}"],
    )  # fmt: skip
    return json.loads(out.read_text())


def general_ability(runner: DemoRunner, name: str, checkpoint: Path, demo: Path) -> dict:
    """The checkpoint's zero-shot accuracy on the Factbook multiple-choice set, as the
    report's ``general_ability`` metric."""
    out = runner.out / "eval" / f"benchmarks_{name}.json"
    runner.stage(
        f"benchmark_{name}",
        runner.torchrun("megatron_sip.eval.benchmarks", "--load", checkpoint,
                        "--factbook-mc-data", demo / "factbook_mc.jsonl", "--output", out),
        [out],
        depends=[name, "corpus"],
    )  # fmt: skip
    result = json.loads(out.read_text())["benchmarks"]["factbook_mc"]
    return {
        "score": result["acc"],
        "stderr": result["acc_stderr"],
        "benchmark": "Factbook multiple choice (held-out countries)",
        "documents": result["documents"],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default=str(ROOT / "runs" / "demo"), type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per training job (DP)")
    parser.add_argument("--ablation", action="store_true", help="the loss/rollout ablation")
    parser.add_argument(
        "--seeds",
        type=lambda text: [int(s) for s in text.split(",")],
        default=[DEMO_SEED, DEMO_SEED + 1, DEMO_SEED + 2],
        help="comma-separated seeds of the ablation's continual runs (each variant and the "
        f"baseline train once per seed; {DEMO_SEED} is the demo's own run, reused)",
    )
    parser.add_argument("--fresh", action="store_true", help="redo every stage")
    parser.add_argument(
        "--learned-roles",
        action="store_true",
        help="also train a judge (SFT, GRPO) and a rewriter (SFT, RL) from the base and the "
        "corpus's labels, run SIP with them colocated, and grade it with the oracle",
    )
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    out = args.output_dir.resolve()
    if args.ablation:
        run_ablation(out, preset, args)
    else:
        run_demo(out, preset, args)


def run_demo(out: Path, preset: Preset, args) -> None:
    from megatron_sip.eval.report import format_table, read_scalars, roles_summary, write_report

    start = time.perf_counter()
    total = 27 if args.learned_roles else 12
    runner = DemoRunner(out, preset, args.nproc, args.fresh, total=total)
    paths = prepare(runner)
    baseline = continual_nll(runner, paths, preset.continual_iters)
    sip = continual_sip(runner, paths, preset.continual_iters, "sip")
    learned = learned_roles(runner, paths) if args.learned_roles else None
    prefixes = held_out_prefixes(paths["demo"])
    baseline_rows = evaluate(runner, "baseline", baseline, prefixes)
    sip_rows = evaluate(runner, "sip", sip, prefixes)
    # The oracle grades every policy; no trained model ever sees it.
    results = compare(runner, "sip", baseline_rows, sip_rows, paths["demo"])
    abilities = {
        name: general_ability(runner, name, checkpoint, paths["demo"])
        for name, checkpoint in (("baseline", baseline), ("sip", sip))
    }
    for policy in ("baseline", "sip"):
        results[policy]["general_ability"] = abilities[policy]
    results_learned = roles = None
    if learned:
        sip_learned = continual_sip(
            runner, paths, preset.continual_iters, "sip_learned", learned=learned
        )
        learned_rows = evaluate(runner, "sip_learned", sip_learned, prefixes)
        results_learned = compare(runner, "sip_learned", baseline_rows, learned_rows, paths["demo"])
        results_learned["baseline"]["general_ability"] = abilities["baseline"]
        results_learned["sip"]["general_ability"] = general_ability(
            runner, "sip_learned", sip_learned, paths["demo"]
        )
        evals = {name: _read(path) for name, path in learned.items() if name.endswith("_eval")}
        roles = roles_summary(
            judge={"sft": evals["judge_sft_eval"], "grpo": evals["judge_eval"]},
            rewriter={"sft": evals["rewriter_sft_eval"], "rl": evals["rewriter_eval"]},
            gold=judge_on_gold_pairs(runner, paths["demo"], [baseline_rows, sip_rows], learned),
        )
    runner.index += 1
    curves = {"sip": read_scalars(out / "tb" / "sip")}
    meta = {
        "preset": args.preset,
        "base_iterations": preset.base_iters,
        "continual_iterations": preset.continual_iters,
        "wall_time_s": round(time.perf_counter() - start, 1),
        "stage_seconds": {k: round(v, 1) for k, v in runner.seconds.items()},
        "commands": runner.commands,
    }
    write_report(out, results, curves, meta, learned=results_learned, roles=roles)
    print(f"[{runner.index}/{runner.total}] report: {out / 'report.md'}", flush=True)
    print(f"total wall time {meta['wall_time_s']:.0f} s", flush=True)
    # The table ends the run.
    print(format_table(results, results_learned), flush=True)


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


@dataclasses.dataclass(frozen=True)
class Variant:
    """One SIP run of the ablation: its flags file under examples/demo/, extra flags, and
    whether its objective is judged (online_dpo, rf_nll) or not (sft_rewrite)."""

    name: str
    args_file: str
    flags: tuple = ()
    judged: bool = True


ABLATION = (
    Variant("sft_rewrite", "sip_sft_rewrite.args", judged=False),
    Variant("rf_nll", "sip_rf_nll.args"),
    Variant("online_dpo_k1", "sip.args", ("--sip-num-rollouts", "1")),
    Variant("online_dpo_k", "sip.args"),  # the demo's SIP run, reused when it is up to date
)


def run_ablation(out: Path, preset: Preset, args) -> None:
    from megatron_sip.eval.report import ablation_table

    seeds = args.seeds
    total = 4 + len(seeds) * (2 + 3 * len(ABLATION))
    runner = DemoRunner(out, preset, args.nproc, args.fresh, total=total)
    paths = prepare(runner)
    iters = preset.continual_iters
    prefixes = held_out_prefixes(paths["demo"])
    rows: dict[str, list] = {variant.name: [] for variant in ABLATION}
    for seed in seeds:
        baseline_name = seeded("baseline", seed)
        baseline = continual_nll(runner, paths, iters, seed)
        baseline_rows = evaluate(runner, baseline_name, baseline, prefixes)
        for variant in ABLATION:
            demo_run = variant.args_file == "sip.args" and not variant.flags
            stage = seeded("sip" if demo_run else f"ablation_{variant.name}", seed)
            checkpoint = continual_sip(runner, paths, iters, stage, variant, seed=seed)
            candidate = evaluate(runner, stage, checkpoint, prefixes)
            rows[variant.name].append(
                compare(runner, stage, baseline_rows, candidate, paths["demo"], baseline_name)
            )
    text = ablation_table(rows)
    (out / "ablation.md").write_text(text)
    (out / "ablation.json").write_text(json.dumps({"seeds": seeds, "runs": rows}, indent=2) + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
