"""Zero-shot multiple-choice benchmarks of a checkpoint, from local files, through lm-eval.

    torchrun --nproc-per-node 2 -m megatron_sip.eval.benchmarks --load runs/demo/sip \\
        --tensor-model-parallel-size 2 --arc-easy-data data/arc_easy_test.parquet \\
        --hellaswag-data data/hellaswag_val.jsonl --output runs/demo/eval/benchmarks_sip.json

No hub at run time: each benchmark is read from the file its flag names, in the benchmark's own
schema (the columns of its Hugging Face dataset; JSONL or parquet). The task configs are
lm-evaluation-harness's own (its prompts, choices and metrics, so the numbers compare with
published ones), included and pointed at the local file; ``--write-tasks DIR`` writes them for
lm-eval's command line instead (``megatron_sip.eval.harness --include_path DIR``).

Every rank runs lm-eval on the ``megatron_sip`` model (``eval.lm_eval_model``); rank 0 writes
``--output``: per benchmark its task, file, document count, accuracy and, where lm-eval defines
it, length-normalised accuracy, with their standard errors.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from megatron_sip.arguments import LaunchConfig, parse_args
from megatron_sip.errors import ConfigError, exits_on_bad_input, require_positive


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A zero-shot benchmark: lm-eval's task config to include (a path under lm_eval/tasks/;
    None: the config is ours), the columns a local file needs, and what differs from the
    included config."""

    flag: str
    task: str
    upstream: Optional[str]
    columns: tuple[str, ...]
    overrides: tuple[tuple[str, object], ...] = ()


FACTBOOK_MC_CONFIG = (
    ("output_type", "multiple_choice"),
    ("doc_to_text", "{{question}}"),
    ("doc_to_choice", "{{choices}}"),
    ("doc_to_target", "{{answer}}"),
    ("target_delimiter", " "),
    (
        "metric_list",
        [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    ),
    ("metadata", {"version": 1.0}),
)

BENCHMARKS = {
    "boolq": Benchmark(
        "--boolq-data", "local_boolq", "super_glue/boolq/default.yaml",
        ("passage", "question"),
        # BoolQ's own files (answer: true/false) and SuperGLUE's (label: true/false) as well as
        # the Hugging Face one (label: 0/1).
        (("process_docs", "!function megatron_sip.eval.benchmarks.boolq_docs"),),
    ),
    "piqa": Benchmark("--piqa-data", "local_piqa", "piqa/piqa.yaml",
                      ("goal", "sol1", "sol2", "label")),
    "hellaswag": Benchmark(
        "--hellaswag-data", "local_hellaswag", "hellaswag/hellaswag.yaml",
        ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    ),
    "arc_easy": Benchmark("--arc-easy-data", "local_arc_easy", "arc/arc_easy.yaml",
                          ("question", "choices", "answerKey")),
    "arc_challenge": Benchmark("--arc-challenge-data", "local_arc_challenge",
                               "arc/arc_challenge.yaml", ("question", "choices", "answerKey")),
    "openbookqa": Benchmark("--openbookqa-data", "local_openbookqa", "openbookqa/openbookqa.yaml",
                            ("question_stem", "choices", "answerKey")),
    "siqa": Benchmark("--siqa-data", "local_siqa", "siqa/siqa.yaml",
                      ("context", "question", "answerA", "answerB", "answerC", "label")),
    "mmlu": Benchmark(
        "--mmlu-data", "local_mmlu", "mmlu/default/_default_template_yaml",
        ("question", "subject", "choices", "answer"),
        # One task over every subject (lm-eval's MMLU averages its subject tasks weighted by
        # size, the same number), each question with its subject's description.
        (("description", "The following are multiple choice questions (with answers) about "
                         "{{subject.replace('_', ' ')}}.\n\n"),),
    ),
    # The demo's general-ability set (tools/build_demo_corpus.py): cloze questions about
    # held-out countries, one true and three false completions.
    "factbook_mc": Benchmark("--factbook-mc-data", "factbook_mc", None,
                             ("question", "choices", "answer"), FACTBOOK_MC_CONFIG),
}  # fmt: skip


@dataclasses.dataclass
class BenchmarkConfig:
    """Local files of the zero-shot benchmarks (each in its Hugging Face dataset's columns,
    JSONL or parquet; a benchmark without a file is not run)."""

    boolq_data: Optional[str] = None
    """BoolQ (passage, question, label or answer), e.g. the validation split."""

    piqa_data: Optional[str] = None
    """PIQA (goal, sol1, sol2, label), e.g. the validation split."""

    hellaswag_data: Optional[str] = None
    """HellaSwag (activity_label, ctx_a, ctx_b, endings, label), e.g. the validation split."""

    arc_easy_data: Optional[str] = None
    """ARC-Easy (question, choices {text, label}, answerKey), e.g. the test split."""

    arc_challenge_data: Optional[str] = None
    """ARC-Challenge (the ARC-Easy columns), e.g. the test split."""

    openbookqa_data: Optional[str] = None
    """OpenBookQA (question_stem, choices {text, label}, answerKey), e.g. the test split."""

    siqa_data: Optional[str] = None
    """Social IQa (context, question, answerA/B/C, label 1-3), e.g. the validation split."""

    mmlu_data: Optional[str] = None
    """MMLU (question, subject, choices, answer 0-3): every subject in one file (the "all"
    configuration's test split) or a glob of per-subject files."""

    factbook_mc_data: Optional[str] = None
    """The demo's Factbook multiple choice (question, choices, answer), written by
    tools/build_demo_corpus.py."""

    benchmark_batch_size: int = 16
    """lm-eval requests per forward pass (per data-parallel rank)."""

    benchmark_limit: Optional[int] = None
    """Documents per benchmark (the first ones; default: all). A limited run is not the
    benchmark's number, and the report says so."""

    def __post_init__(self):
        require_positive("--benchmark-batch-size", self.benchmark_batch_size)
        if self.benchmark_limit is not None:
            require_positive("--benchmark-limit", self.benchmark_limit)

    def selected(self) -> dict[str, str]:
        """Benchmark name -> its local file, for those given."""
        return {
            name: getattr(self, f"{name}_data")
            for name in BENCHMARKS
            if getattr(self, f"{name}_data")
        }


def boolq_docs(dataset):
    """BoolQ with an integer label whichever release the file is (``answer`` or ``label``,
    boolean or 0/1)."""

    def normalise(doc):
        if "label" in doc and doc["label"] is not None:
            return {"label": int(doc["label"])}
        if "answer" in doc:
            return {"label": int(doc["answer"])}
        raise ValueError(f"a BoolQ document without label or answer: {doc['question']!r}")

    return dataset.map(normalise)


def _file_format(flag: str, path: str) -> str:
    suffixes = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    fmt = suffixes.get(Path(path).suffix)
    if fmt is None:
        raise ConfigError(flag, f"{path}: expected a .jsonl, .json or .parquet file")
    return fmt


def check_benchmark_file(name: str, path: str) -> int:
    """The file's document count, after checking that it exists and has the benchmark's
    columns (an error names the flag, the file and what is missing)."""
    import glob

    import datasets

    benchmark = BENCHMARKS[name]
    fmt = _file_format(benchmark.flag, path)
    if not glob.glob(path):
        raise ConfigError(benchmark.flag, f"{path} does not exist")
    try:
        data = datasets.load_dataset(fmt, data_files={"test": path}, split="test")
    except Exception as error:  # noqa: BLE001 - any reader error is this file's
        raise ConfigError(benchmark.flag, f"{path}: not readable as {fmt}: {error}") from None
    missing = [c for c in benchmark.columns if c not in data.column_names]
    if name == "boolq" and not {"label", "answer"} & set(data.column_names):
        missing.append("label (or answer)")
    if missing:
        raise ConfigError(
            benchmark.flag,
            f"{path}: missing columns {missing} of {name}'s schema (has {data.column_names})",
        )
    if len(data) == 0:
        raise ConfigError(benchmark.flag, f"{path}: no documents")
    return len(data)


def task_config(name: str, path: str) -> dict:
    """lm-eval's task config of benchmark ``name`` read from the local ``path``."""
    import lm_eval.tasks

    benchmark = BENCHMARKS[name]
    config: dict = {}
    if benchmark.upstream is not None:
        config["include"] = str(Path(lm_eval.tasks.__file__).parent / benchmark.upstream)
    config.update(
        task=benchmark.task,
        tag=["megatron_sip_local"],  # not the upstream tags: those name the hub's tasks
        dataset_path=_file_format(benchmark.flag, path),
        dataset_name=None,
        dataset_kwargs={"data_files": {"test": str(Path(path).resolve())}},
        training_split=None,
        validation_split=None,
        test_split="test",
        fewshot_split=None,
    )
    config.update(benchmark.overrides)
    return config


def write_task_configs(files: dict[str, str], directory: Path) -> list[str]:
    """Writes the task configs of ``files`` (benchmark -> local file) under ``directory``;
    returns their task names."""
    import yaml

    from megatron_sip.eval.continuations import write_atomically

    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for name, path in files.items():
        config = task_config(name, path)
        function = config.pop("process_docs", None)
        text = yaml.safe_dump(config, sort_keys=False, width=1000)
        if function is not None:  # a YAML tag, which safe_dump cannot write
            text += f"process_docs: {function}\n"
        # Every rank writes the same files: a rename, so none reads another's half-written one.
        write_atomically(directory / f"{config['task']}.yaml", text)
        names.append(config["task"])
    return names


def run_benchmarks(lm, files: dict[str, str], directory: Path, limit: Optional[int]) -> dict:
    """lm-eval zero-shot on ``lm`` for each benchmark of ``files``; task configs are written
    under ``directory``. Collective when ``lm`` is split over ranks (every rank returns the
    results)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = write_task_configs(files, directory)
    output = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=0,
        limit=limit,
        task_manager=TaskManager(include_path=str(directory), include_defaults=False),
        log_samples=False,
        bootstrap_iters=1000,
    )
    # lm-eval returns its results on the first process of each node only (LOCAL_RANK 0); the
    # global rank 0's reach every rank.
    results = _summary(output, files, tasks, limit) if output is not None else None
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        shared = [results]
        torch.distributed.broadcast_object_list(shared, src=0)
        results = shared[0]
    return results


def _summary(output: dict, files: dict[str, str], tasks: list[str], limit) -> dict:
    results = {}
    for (name, path), task in zip(files.items(), tasks):
        metrics = output["results"][task]
        entry = {"task": task, "file": path, "documents": output["n-samples"][task]["effective"]}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in metrics:
                entry[metric] = 100.0 * metrics[f"{metric},none"]
                stderr = metrics.get(f"{metric}_stderr,none")
                entry[f"{metric}_stderr"] = 100.0 * stderr if isinstance(stderr, float) else None
        entry["limited"] = limit is not None
        results[name] = entry
    return results


@dataclasses.dataclass
class BenchmarkRunConfig:
    """What ``python -m megatron_sip.eval.benchmarks`` evaluates and where the results go."""

    load: Optional[str] = None
    """Checkpoint to evaluate."""

    output: Optional[str] = None
    """JSON file of the results (rank 0 writes it)."""

    write_tasks: Optional[str] = None
    """Only write the task configs to this directory (for lm-eval's command line,
    ``--include_path``) and stop."""

    model_args: Optional[str] = None
    """Flags file with the model-shape and tokenizer flags, for checkpoints without saved
    settings."""

    def __post_init__(self):
        if not self.write_tasks:
            for flag, value in (("--load", self.load), ("--output", self.output)):
                if not value:
                    raise ConfigError(flag, "required (or --write-tasks DIR)")


@dataclasses.dataclass
class BenchmarkJobConfig(LaunchConfig):
    """Every setting of ``python -m megatron_sip.eval.benchmarks``."""

    benchmarks: BenchmarkConfig
    run: BenchmarkRunConfig


def checked_files(config: BenchmarkConfig) -> dict[str, str]:
    """The benchmarks' files, each checked (:func:`check_benchmark_file`)."""
    files = config.selected()
    if files:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            flag = BENCHMARKS[next(iter(files))].flag
            raise ConfigError(
                flag, "benchmarks need lm-evaluation-harness: pip install -e '.[eval]'"
            ) from None
    for name, path in files.items():
        check_benchmark_file(name, path)
    return files


@exits_on_bad_input
def main(argv=None) -> None:
    import tempfile

    from megatron_sip.eval.continuations import write_atomically
    from megatron_sip.eval.lm_eval_model import MegatronSIPLM
    from megatron_sip.initialize import destroy_distributed, initialize_distributed
    from megatron_sip.log import print_rank_0, setup_logging

    configs = parse_args(argv, BenchmarkJobConfig, description=__doc__)
    run = configs.run
    files = checked_files(configs.benchmarks)
    if not files:
        flags = ", ".join(benchmark.flag for benchmark in BENCHMARKS.values())
        raise ConfigError("--<benchmark>-data", f"no benchmark file given (one of {flags})")
    if run.write_tasks:
        tasks = write_task_configs(files, Path(run.write_tasks))
        print(f"wrote {', '.join(tasks)} to {run.write_tasks}")
        return
    context = initialize_distributed(configs.parallel, configs.platform.device)
    setup_logging()
    lm = MegatronSIPLM(
        run.load,
        configs.parallel.tensor_model_parallel_size,
        configs.parallel.pipeline_model_parallel_size,
        batch_size=configs.benchmarks.benchmark_batch_size,
        model_args=run.model_args,
        context=context,
    )
    with tempfile.TemporaryDirectory() as directory:
        results = run_benchmarks(lm, files, Path(directory), configs.benchmarks.benchmark_limit)
    if context.rank == 0:
        output = Path(run.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        report = {"checkpoint": run.load, "benchmarks": results}
        write_atomically(output, json.dumps(report, indent=2) + "\n")
        for name, entry in results.items():
            print_rank_0(f"{name}: acc {entry['acc']:.1f} ({entry['documents']} documents)")
        print_rank_0(f"wrote {output}")
    destroy_distributed()


if __name__ == "__main__":
    main()
