"""Megatron-LM's own example scripts run here: every flag of
``examples/llama/train_llama3_8b_h100_fp8.sh`` and ``examples/gpt3/train_gpt3_175b_distributed.sh``
(as ``examples/megatron_lm/*.args`` hold them) is accepted, or refused with the reason asserted,
and the rest trains a tiny model of the same shape family for a few iterations under torchrun."""

from __future__ import annotations

import importlib.util
import json

import pytest

from megatron_sip.arguments import parse_args
from megatron_sip.errors import ConfigError
from megatron_sip.models.checkpointing import read_tracker
from megatron_sip.pretrain import PretrainConfig

from .pretrain_utils import ROOT, run_module, scalars
from .test_tokenizers import write_gpt2_files

SCRIPTS = ROOT / "examples" / "megatron_lm"
FLAGS_TOOL = ROOT / "tools" / "bench" / "megatron_lm_flags.py"
LLAMA = SCRIPTS / "train_llama3_8b_h100_fp8.args"
GPT3 = SCRIPTS / "train_gpt3_175b_distributed.args"

# The scripts' shapes made tiny (flags given later on the command line win, as in Megatron-LM).
LLAMA_TINY = SCRIPTS / "tiny_llama3.args"
GPT3_TINY = SCRIPTS / "tiny_gpt3.args"

# Flags refused on this CPU machine, each group with the flag its error names and words of the
# reason. Everything else in the scripts is honoured.
LLAMA_REFUSED = {
    ("--attention-backend",): "Transformer Engine attention kernel",
    ("--cross-entropy-loss-fusion",): "--cross-entropy-loss-fusion",
    (
        "--fp8-format",
        "--fp8-amax-history-len",
        "--fp8-amax-compute-algo",
        "--fp8-param-gather",
    ): "Transformer Engine on a GPU",
    ("--empty-unused-memory-level",): "no allocator cache",
    ("--profile", "--profile-step-start", "--profile-step-end"): "nsys",
    # Not a device limit: Megatron-LM ignores it unless --tokenizer-type is TikTokenizer.
    ("--tiktoken-pattern",): "TikTokenizer",
}
GPT3_REFUSED = {
    # Megatron-LM refuses this combination itself ("expected no batch-size rampup for
    # iteration-based training"): the script as published does not start there either.
    ("--rampup-batch-size",): "needs --train-samples",
}


def _flags_tool():
    spec = importlib.util.spec_from_file_location("megatron_lm_flags", FLAGS_TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FLAGS = _flags_tool()
read_flags = FLAGS.read_flags


def drop(flags: list[str], names) -> list[str]:
    """``flags`` without each flag of ``names`` and its values."""
    for name in names:
        flags = FLAGS.drop(flags, name)
    return flags


def assert_refusals(flags: list[str], refused: dict) -> list[str]:
    """Each refused group alone (the others dropped) fails to parse, naming its first flag and
    the reason; with every group dropped the flags parse. Returns those flags."""
    everything = [name for group in refused for name in group]
    for group, reason in refused.items():
        others = [name for name in everything if name not in group]
        with pytest.raises(ConfigError) as error:
            parse_args(drop(flags, others), PretrainConfig, world_size=2, exit_on_error=False)
        assert error.value.flag == group[0], str(error.value)
        assert reason in str(error.value), str(error.value)
    accepted = drop(flags, everything)
    parse_args(accepted, PretrainConfig, world_size=2, exit_on_error=False)
    # tools/bench/megatron_lm_flags.py (what gpu_check.sh runs) finds the same refusals alone.
    found, refusals = FLAGS.accepted_flags(flags, world_size=2)
    assert found == accepted
    assert {line.split(":")[0] for line in refusals} == set(everything)
    return accepted


def test_script_files_hold_every_flag_of_the_scripts():
    """The args files are the scripts' flag sets: 74 flags of the 8B script's mock-data branch
    (its real-data branch adds --data-path and --tokenizer-model), 34 of the 175B script's."""
    names = {path: [t for t in read_flags(path) if t.startswith("--")] for path in (LLAMA, GPT3)}
    assert len(names[LLAMA]) == len(set(names[LLAMA])) == 74
    assert len(names[GPT3]) == len(set(names[GPT3])) == 34


@pytest.mark.slow
def test_llama3_8b_script_flags_train_on_cpu(tmp_path):
    paths = [
        "--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt"),
        "--tensorboard-dir", str(tmp_path / "tb"), "--data-cache-path", str(tmp_path / "cache"),
    ]  # fmt: skip
    flags = assert_refusals([*read_flags(LLAMA), *read_flags(LLAMA_TINY), *paths], LLAMA_REFUSED)
    # The script's layout at 2 ranks: TP=1 (so --sequence-parallel switches off, as in
    # Megatron-LM), data-parallel 2 with the distributed optimizer and both overlaps.
    output = run_module(2, "megatron_sip.pretrain", *flags)
    assert "--sequence-parallel: disabled" in output
    assert read_tracker(tmp_path / "ckpt") == 4  # --train-samples 16 / global batch 4
    losses = scalars(tmp_path / "tb", "lm loss")
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(0 < loss < 10 for loss in losses.values())
    assert "throughput" in " ".join(output.splitlines()[-40:]).lower()  # --log-throughput


@pytest.mark.slow
def test_gpt3_175b_script_flags_train_on_cpu(tmp_path):
    vocab_file, merge_file = write_gpt2_files(tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    # Enough documents that the script's 949,50,1 split leaves one for the test split.
    lines = [json.dumps({"text": " ".join(["low lower lo"] * (3 + i % 7))}) for i in range(600)]
    corpus.write_text("\n".join(lines) + "\n")
    prefix = tmp_path / "gpt2"
    run_preprocess = [
        "--input", str(corpus), "--output-prefix", str(prefix), "--tokenizer-type",
        "GPT2BPETokenizer", "--vocab-file", str(vocab_file), "--merge-file", str(merge_file),
        "--append-eod", "--workers", "1",
    ]  # fmt: skip
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), *run_preprocess],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    paths = [
        "--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt"),
        "--tensorboard-dir", str(tmp_path / "tb"), "--data-path", f"{prefix}_text_document",
        "--vocab-file", str(vocab_file), "--merge-file", str(merge_file),
    ]  # fmt: skip
    flags = assert_refusals([*read_flags(GPT3), *read_flags(GPT3_TINY), *paths], GPT3_REFUSED)
    # fp16 with dynamic loss scaling at pipeline-parallel 2: 4 iterations.
    run_module(2, "megatron_sip.pretrain", *flags)
    assert read_tracker(tmp_path / "ckpt") == 4
    assert sorted(scalars(tmp_path / "tb", "lm loss")) == [1, 2, 3, 4]
    # The loss scale starts at 2**32 and halves on every overflowing step.
    scales = scalars(tmp_path / "tb", "loss-scale")
    assert scales[1] <= 2.0**32 and all(scales[i + 1] <= scales[i] for i in range(1, 4))
