"""Hugging Face import/export (tools/convert_checkpoint.py, megatron_sip/models/hf): tiny random
models of every supported architecture, built locally with transformers' config classes."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .distributed import run_ranks
from .hf_utils import ARCHITECTURES, VOCAB, make_hf_model
from .pretrain_utils import ROOT, run_module

TOOL = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]
LAYOUTS = ((1, 1), (2, 1), (1, 2))  # (TP, PP) on a world of two ranks (TP=1 PP=1: DP=2)
NEW_TOKENS = 16


def _tokens() -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (2, 24), generator=generator)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{arch: (directory, reference logits [2, 24, VOCAB], greedy continuation [2, 16])} from
    transformers' own models."""
    root = tmp_path_factory.mktemp("hf")
    models = {}
    tokens = _tokens()
    for number, arch in enumerate(ARCHITECTURES):
        model = make_hf_model(arch, root / arch, seed=number)
        with torch.no_grad():
            logits = model(tokens).logits
            greedy = model.generate(
                tokens,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                attention_mask=torch.ones_like(tokens),
            )[:, tokens.shape[1] :]
        models[arch] = (root / arch, logits, greedy)
    return models


def _import_and_run(hf_dirs: dict, output: Path) -> None:
    """On each rank: imports every model at every layout, loads it back as a role model would
    (shape and tokenizer from the checkpoint), and records logits and greedy tokens (rank 0)."""
    from megatron.core import parallel_state
    from megatron.core.rerun_state_machine import destroy_rerun_state_machine

    from megatron_sip.inference.generation import generate
    from megatron_sip.inference.pipeline import broadcast_from_last_stage, pipeline_forward
    from megatron_sip.inference.sampling import SamplingConfig
    from megatron_sip.initialize import ParallelConfig, destroy_distributed, initialize_distributed
    from megatron_sip.models.hf.convert import import_checkpoint
    from megatron_sip.roles.megatron_backend import RoleModel

    tokens = _tokens()
    try:
        for tp, pp in LAYOUTS:
            if parallel_state.model_parallel_is_initialized():  # the next layout
                parallel_state.destroy_model_parallel()
                destroy_rerun_state_machine()
            parallel = ParallelConfig(
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
            )
            context = initialize_distributed(parallel, "cpu")
            for arch, hf_dir in hf_dirs.items():
                target = output / f"{arch}_tp{tp}_pp{pp}"
                result = import_checkpoint(hf_dir, target, parallel, context)
                role = RoleModel(str(target), parallel, context.pg_collection)
                positions = torch.arange(tokens.shape[1]).expand_as(tokens)
                logits = pipeline_forward(
                    role.module, tokens, positions, runtime_gather_output=True
                )
                if logits is None:
                    logits = torch.zeros(*tokens.shape, role.vocab_size)
                logits = broadcast_from_last_stage(
                    logits.float().contiguous(), role.module.pg_collection.pp
                )
                rollouts = generate(
                    role.module,
                    tokens.tolist(),
                    num_samples=1,
                    num_tokens=NEW_TOKENS,
                    sampling=SamplingConfig(sip_temperature=0.0),
                    seed=0,
                    vocab_size=VOCAB,
                )
                if context.rank == 0:
                    torch.save(
                        {
                            "logits": logits[..., :VOCAB],
                            "padded_vocab": logits.shape[-1],
                            "greedy": rollouts.tokens[:, 0],
                            "model": result.model,
                        },
                        output / f"{arch}_tp{tp}_pp{pp}.pt",
                    )
        # ours (TP=2) -> HF -> ours (this last layout, PP=2).
        if context.rank == 0:
            _export(output / "llama_tp2_pp1", output / "llama_exported", max_shard_bytes=50_000)
        torch.distributed.barrier()
        import_checkpoint(output / "llama_exported", output / "llama_again", parallel, context)
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def imported(hf_models, tmp_path_factory):
    output = tmp_path_factory.mktemp("imported")
    run_ranks(_import_and_run, 2, {a: d for a, (d, _, _) in hf_models.items()}, output)
    return output


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_imported_model_matches_transformers_at_any_layout(arch, hf_models, imported):
    _, reference, greedy = hf_models[arch]
    for tp, pp in LAYOUTS:
        ours = torch.load(imported / f"{arch}_tp{tp}_pp{pp}.pt", weights_only=False)
        assert ours["padded_vocab"] == (512 if tp == 2 else 384)
        difference = (ours["logits"] - reference).abs().max().item()
        assert difference < 1e-4, f"{arch} TP={tp} PP={pp}: max |logit difference| {difference}"
        assert torch.equal(ours["greedy"], greedy), f"{arch} TP={tp} PP={pp}: greedy tokens differ"
    model = ours["model"]
    assert model.add_qkv_bias == (arch == "qwen2")
    assert model.qk_layernorm == (arch == "qwen3")
    assert model.use_rope_scaling == (arch == "llama")
    assert model.untie_embeddings_and_output_weights == (arch in ("llama", "mistral"))
    assert (model.kv_channels == 24) == (arch == "qwen3")
    flags = (imported / f"{arch}_tp2_pp1" / "model.args").read_text()
    assert "--tokenizer-type HuggingFaceTokenizer" in flags
    assert ("--tokenizer-hf-include-special-tokens" in flags) == (arch in ("llama", "mistral"))


def _safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _export(load: Path, output: Path, **options) -> None:
    """The export, in this process (it needs no torch.distributed world)."""
    from megatron_sip.models.hf.convert import export_checkpoint

    export_checkpoint(load, output, **options)


@pytest.mark.parametrize("arch", ("llama", "qwen3"))
def test_hf_to_ours_to_hf_is_exact(arch, hf_models, imported, tmp_path):
    """HF -> ours (TP=2) -> HF gives back the original tensors, tokenizer and architecture, and
    transformers loads it to the same logits (untied Llama with RoPE scaling; tied Qwen3)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dir, reference, _ = hf_models[arch]
    exported = tmp_path / "exported"
    _export(imported / f"{arch}_tp2_pp1", exported, max_shard_bytes=50_000)
    assert (exported / "model.safetensors.index.json").is_file()
    original, back = _safetensors(hf_dir), _safetensors(exported)
    assert sorted(back) == sorted(
        k for k in original if not k.startswith("lm_head") or arch == "llama"
    )
    for name, tensor in back.items():
        assert torch.equal(tensor, original[name]), name
    config = AutoConfig.from_pretrained(str(exported))
    assert config.architectures == AutoConfig.from_pretrained(str(hf_dir)).architectures
    model = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(model(_tokens()).logits, reference)
    tokenizer_files = {p.name for p in exported.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= tokenizer_files


def test_ours_to_hf_to_ours_is_exact(imported):
    """ours (TP=2) -> HF -> ours (PP=2): the same tensors."""
    assert (imported / "llama_exported" / "model.safetensors.index.json").is_file()
    first = _checkpoint_tensors(imported / "llama_tp2_pp1")
    second = _checkpoint_tensors(imported / "llama_again")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def _checkpoint_tensors(root: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a checkpoint, whole (vocabulary tensors cut to VOCAB rows)."""
    from megatron_sip.models.checkpointing import CheckpointReader

    reader = CheckpointReader(root / "iter_0000000")
    keys = [
        key
        for key, meta in reader.metadata.items()
        if key.startswith(("embedding", "decoder", "output_layer")) and hasattr(meta, "size")
    ]
    vocabulary = ("word_embeddings.weight", "output_layer.weight")
    return {
        key: value[:VOCAB] if key.endswith(vocabulary) else value
        for key, value in reader.read(keys).items()
    }


def _config_json(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


@pytest.mark.slow
def test_pretraining_and_sip_start_from_imported_checkpoints(hf_models, imported, tmp_path):
    """--pretrained-checkpoint with --use-checkpoint-args takes an imported model's shape and
    tokenizer (no model flags); a TP=2 import loads at TP=1; a SIP step runs an imported policy
    judged by an imported judge; the trained result exports to a model transformers loads."""
    from transformers import AutoModelForCausalLM

    from megatron_sip.models.checkpointing import saved_model_settings

    demo = tmp_path / "demo"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "build_demo_corpus.py"), "--output-dir", str(demo),
         "--seed", "7"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    policy = imported / "llama_tp2_pp1"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input",
         str(demo / "corpus.jsonl"), "--output-prefix", str(tmp_path / "corpus"), "--workers", "1",
         f"@{policy / 'tokenizer.args'}", "--append-eod"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    data = ["--data-path", str(tmp_path / "corpus_text_document"), "--split", "98,2,0"]
    common = [
        "--device", "cpu", "--use-checkpoint-args", "--micro-batch-size", "2",
        "--global-batch-size", "2", "--train-iters", "1", "--lr", "1e-4", "--lr-warmup-iters",
        "0", "--lr-decay-style", "constant", "--eval-iters", "0", "--log-interval", "1",
    ]  # fmt: skip
    # The SIP step runs on one rank beside the single-process steps below (two cores).
    judge = imported / "qwen3_tp1_pp1"
    background = concurrent.futures.ThreadPoolExecutor(1)
    sip_run = background.submit(
        run_module, 1, "megatron_sip.train_sip", *common, *data,
        "--pretrained-checkpoint", str(imported / "llama_tp1_pp1"), "--seq-length", "96",
        "--sip-suffix-len", "12", "--sip-num-rollouts", "2",
        "--sip-objectives", "quality,safety,factuality",
        "--judge-backend", "megatron", "--judge-load", str(judge),
        # The instruct judges' chat pack through the imported model's own chat template; the
        # random model only has to answer (its calibration accuracy is chance).
        "--judge-prompt-dir", "qwen", "--judge-min-calibration-accuracy", "0",
        "--rewriter-backend", "oracle", "--rewriter-oracle-data", str(demo),
        "--save", str(tmp_path / "sip"),
    )  # fmt: skip
    background.shutdown(wait=False)
    trained = tmp_path / "trained"
    output = run_module(
        1, "megatron_sip.pretrain", *common, *data, "--pretrained-checkpoint", str(policy),
        "--seq-length", "64", "--save", str(trained),
    )  # fmt: skip
    assert f"--pretrained-checkpoint: weights from {policy}" in output
    model, tokenizer = saved_model_settings(trained)
    assert model.use_rope_scaling and model.rotary_base == 500000 and model.seq_length == 64
    assert tokenizer.tokenizer_type == "HuggingFaceTokenizer"
    assert tokenizer.tokenizer_hf_include_special_tokens and tokenizer.model_vocab_size == VOCAB

    # Resuming the optimizer across a change of the vocabulary padding cannot work: refused.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK"))}
    refused = subprocess.run(
        [sys.executable, "-m", "megatron_sip.pretrain", f"@{policy / 'model.args'}", *common[3:],
         *data, "--device", "cpu", "--seq-length", "64", "--make-vocab-size-divisible-by", "256",
         "--load", str(trained)],
        capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "pads the vocabulary to 384 rows" in refused.stderr
    assert "and this run to 512" in refused.stderr and "--no-load-optim" in refused.stderr

    # The evaluation and the judge server read the shape and tokenizer from the checkpoint too.
    continuations = tmp_path / "continuations.jsonl"
    run_module(
        1, "megatron_sip.eval.continuations", "--device", "cpu", "--load", str(policy),
        "--prefixes", str(demo / "eval_safe_prefixes.jsonl"), "--output", str(continuations),
        "--eval-num-tokens", "8", "--eval-max-prefix-tokens", "48",
    )  # fmt: skip
    rows = [json.loads(line) for line in continuations.read_text().splitlines()]
    assert rows and all(isinstance(row["continuation"], str) for row in rows)
    import httpx

    from .test_serve_judge import ServerProcess

    server = ServerProcess(
        [sys.executable, str(ROOT / "tools" / "serve_judge.py"), "--load", str(judge),
         "--port", "0", "--device", "cpu", "--model-name", "qwen3"]
    )  # fmt: skip
    try:
        url = server.wait_ready(timeout=120)
        completion = httpx.post(
            f"{url}/v1/completions",
            json={"model": "qwen3", "prompt": "Paris is", "max_tokens": 4, "temperature": 0},
            timeout=60,
        )
        assert completion.status_code == 200, completion.text
        assert isinstance(completion.json()["choices"][0]["text"], str)
        # The imported instruct model's chat template serves the chat endpoint.
        chat = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "qwen3", "messages": [{"role": "user", "content": "Is it safe?"}],
                  "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 5},
            timeout=60,
        )  # fmt: skip
        assert chat.status_code == 200, chat.text
        assert len(chat.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 5
    finally:
        assert server.stop() == 0

    exported = tmp_path / "exported"
    run = subprocess.run(
        [*TOOL, "export", "--load", str(trained), "--output", str(exported)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"-> {exported} in" in run.stdout
    hf_model = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32)
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    original = _safetensors(hf_models["llama"][0])
    changed = _safetensors(exported)
    assert original.keys() == changed.keys()
    assert not torch.equal(original["model.norm.weight"], changed["model.norm.weight"])
    output = sip_run.result()
    assert "continual SIP from the weights of" in output and "iteration      1/1" in output
    assert "judge self-check passed: 24 tasks from" in output, output[-3000:]
    assert "update skipped" not in output, output[-3000:]
    # The SIP run's EMA reference, beside its policy in the same checkpoint.
    for weights in ("model", "reference"):
        target = tmp_path / f"sip_{weights}"
        _export(tmp_path / "sip", target, weights=weights)
        AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
    policy_weights = _safetensors(tmp_path / "sip_model")
    reference_weights = _safetensors(tmp_path / "sip_reference")
    assert policy_weights.keys() == reference_weights.keys() == original.keys()
    assert any(not torch.equal(policy_weights[k], reference_weights[k]) for k in original)


def _convert_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL[1])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.main


def _variant(hf_dir: Path, target: Path, arch: str = "llama", **changes) -> Path:
    """A copy of a tiny model directory with config.json fields changed."""
    import shutil

    shutil.copytree(hf_dir, target)
    config = _config_json(target)
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    "case, expected",
    [
        ("architecture", "config.json: architectures: GPTNeoXForCausalLM is not supported"),
        ("sliding_window", "config.json: sliding_window: 4096 is not supported"),
        ("qwen_sliding_window", "config.json: use_sliding_window: True is not supported"),
        ("rope_type", "config.json: rope_parameters.rope_type: 'yarn' is not supported"),
        ("missing_shard", "weight_map names model-00003-of-"),
        ("shape", "has shape [96, 64], but config.json (intermediate_size, hidden_size) implies"),
    ],
)
def test_import_refuses_what_it_cannot_convert_naming_file_and_field(
    case, expected, hf_models, tmp_path, capsys
):
    llama, mistral, qwen = (hf_models[a][0] for a in ("llama", "mistral", "qwen2"))
    target = tmp_path / "model"
    if case == "architecture":
        _variant(llama, target, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    elif case == "sliding_window":
        _variant(mistral, target, sliding_window=4096)
    elif case == "qwen_sliding_window":
        _variant(qwen, target, use_sliding_window=True, sliding_window=64)
    elif case == "rope_type":
        _variant(qwen, target, rope_parameters={"rope_type": "yarn", "factor": 4.0})
    elif case == "missing_shard":
        _variant(llama, target)
        (target / next(p.name for p in target.glob("model-00003-of-*.safetensors"))).unlink()
    else:
        _variant(llama, target, intermediate_size=128)
    with pytest.raises(SystemExit) as exit_info:
        _convert_main()(["import", "--hf-model", str(target), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert expected in message, message
    assert str(target) in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_import_streams_layers_into_each_ranks_shard(tmp_path):
    """A 157 MiB model imported at PP=4: each rank's peak memory grows by its quarter of the
    model, a copy of its SwiGLU input weights (Megatron-Core's checkpoint writer copies the gate
    and up halves it saves as separate pieces), about a layer and a fixed overhead, which is far
    less than the whole model (peak resident memory, as the tool prints it)."""
    import re

    from transformers import AutoModelForCausalLM

    from .hf_utils import hf_config, write_tokenizer

    config = hf_config(
        "llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=16,
        num_attention_heads=8, num_key_value_heads=4,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(str(hf_dir), max_shard_size="50MB")
    write_tokenizer(hf_dir, adds_bos=True)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    del model
    run = subprocess.run(
        [*TOOL, "import", "--hf-model", str(hf_dir), "--output", str(tmp_path / "out"),
         "--pipeline-model-parallel-size", "4"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    print(run.stdout)
    growth = [int(g) * 2**20 for g in re.findall(r"rank \d: \+(\d+) MiB", run.stdout)]
    shards = [int(s) * 2**20 for s in re.findall(r"\(shard (\d+) MiB\)", run.stdout)]
    assert len(growth) == 4 and len(shards) == 4, run.stdout
    fc1_bytes = 2 * config.intermediate_size * config.hidden_size * 4 * 4  # 4 layers a rank
    for grown, shard in zip(growth, shards):
        assert abs(shard - model_bytes / 4) < 0.05 * model_bytes, (shard, model_bytes)
        bound = shard + fc1_bytes + 2 * layer_bytes + 32 * 2**20
        assert grown < bound < 0.8 * model_bytes, (grown, shard, layer_bytes, model_bytes)


def test_hugging_face_tokenizer_bos_and_chat_template(tmp_path):
    """BOS as the model's tokenizer adds it (Llama yes, Qwen no, via the imported flags), and
    the chat template of tokenizer_config.json rendered as transformers renders it."""
    from transformers import AutoTokenizer

    from megatron_sip.data.tokenizers import HuggingFaceTokenizer
    from megatron_sip.models.hf.convert import hf_model_settings

    from .hf_utils import CHAT_TEMPLATE, write_tokenizer

    for adds_bos in (True, False):
        directory = tmp_path / f"bos_{adds_bos}"
        write_tokenizer(directory, adds_bos=adds_bos)
        (directory / "config.json").write_text(json.dumps(hf_config_json("llama")))
        _, settings, _ = hf_model_settings(directory, directory)
        assert settings.tokenizer_hf_include_special_tokens == adds_bos
        ours = HuggingFaceTokenizer(str(directory), settings.tokenizer_hf_include_special_tokens)
        reference = AutoTokenizer.from_pretrained(str(directory))
        text = "Paris is the capital of France."
        assert ours.tokenize(text) == reference(text)["input_ids"]
        assert (ours.tokenize(text)[0] == ours.bos) == adds_bos
        messages = [{"role": "user", "content": "Is water wet?"}]
        assert ours.chat_template == CHAT_TEMPLATE
        rendered = ours.render_chat(messages)
        assert rendered == reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        assert rendered.endswith("<|im_start|>assistant\n")
        assert ours.encode_chat(messages) == reference.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    with pytest.raises(ValueError, match="has no chat template"):
        HuggingFaceTokenizer(str(directory)).render_chat(messages)


def hf_config_json(arch: str) -> dict:
    from .hf_utils import hf_config

    config = hf_config(arch).to_dict()
    config["architectures"] = [{"llama": "LlamaForCausalLM"}[arch]]
    return config
