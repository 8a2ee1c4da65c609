"""Flags come from the config dataclasses; every bad setting names its flag and the fix."""

from __future__ import annotations

import pytest

from megatron_sip.arguments import build_parser, config_groups, field_docs, parse_args
from megatron_sip.errors import ConfigError
from megatron_sip.models.config import ModelConfig, transformer_engine_available

MODEL = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--tokenizer-type", "NullTokenizer", "--vocab-size", "256",
]  # fmt: skip


def parse(*flags, world_size=1):
    return parse_args([*MODEL, *flags], world_size=world_size, exit_on_error=False)


def test_every_field_is_a_documented_flag():
    from megatron_sip.pretrain import PretrainConfig
    from megatron_sip.train_judge import JudgeGRPOJobConfig
    from megatron_sip.train_rewriter import RewriterTrainJobConfig
    from megatron_sip.train_sip import SIPJobConfig
    from megatron_sip.training.judge_sft import JudgeSFTJobConfig

    groups = config_groups(SIPJobConfig)
    help_text = build_parser(groups).format_help()
    for job in (PretrainConfig, JudgeSFTJobConfig, JudgeGRPOJobConfig, RewriterTrainJobConfig):
        build_parser(config_groups(job))  # no flag is declared twice
        groups.update(config_groups(job))
    for cls in groups.values():
        docs = field_docs(cls)
        for name in cls.__dataclass_fields__:
            assert docs.get(name), f"{cls.__name__}.{name} has no docstring"
    for flag in (
        "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--sequence-parallel",
        "--num-layers", "--hidden-size", "--num-attention-heads", "--group-query-attention",
        "--num-query-groups", "--ffn-hidden-size", "--seq-length", "--max-position-embeddings",
        "--swiglu", "--normalization", "--position-embedding-type",
        "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--transformer-impl",
        "--micro-batch-size", "--global-batch-size", "--train-iters", "--lr", "--min-lr",
        "--lr-decay-style", "--lr-warmup-iters", "--clip-grad", "--weight-decay",
        "--adam-beta1", "--adam-beta2", "--bf16", "--use-distributed-optimizer", "--seed",
        "--log-interval", "--tokenizer-type", "--tokenizer-model", "--save", "--load",
        "--save-interval", "--ckpt-format", "--device", "--data-path", "--split",
        "--eval-interval", "--eval-iters", "--exit-interval", "--finetune", "--tensorboard-dir",
        "--wandb-project", "--sip-suffix-len", "--sip-split-point", "--sip-temperature",
        "--sip-top-p", "--sip-top-k", "--judge-backend", "--rewriter-backend", "--sip-loss",
    ):  # fmt: skip
        assert flag in help_text, flag
    assert "Number of key/value head groups" in help_text  # the docstring is the help
    # --sip-loss lists the objectives table's names.
    assert "{online_dpo,rf_nll,sft_rewrite}" in help_text


def test_llama_flags_parse_into_configs(tmp_path):
    flags_file = tmp_path / "llama.args"
    flags_file.write_text(
        "# a Llama-style model\n--normalization RMSNorm --swiglu\n"
        "--position-embedding-type rope --group-query-attention --num-query-groups 2\n"
        "--untie-embeddings-and-output-weights --disable-bias-linear\n"
    )
    configs = parse(
        f"@{flags_file}", "--tensor-model-parallel-size", "2", "--micro-batch-size", "2",
        "--global-batch-size", "8", "--lr", "3e-4", "--device", "cpu", world_size=4,
    )  # fmt: skip
    model = configs.model
    assert (model.normalization, model.swiglu, model.position_embedding_type) == (
        "RMSNorm", True, "rope",
    )  # fmt: skip
    assert model.group_query_attention and model.num_query_groups == 2
    assert model.untie_embeddings_and_output_weights and model.disable_bias_linear
    assert configs.parallel.tensor_model_parallel_size == 2
    assert configs.parallel.data_parallel_size(4) == 2
    assert configs.training.lr == 3e-4
    assert configs.training.num_microbatches(2) == 2
    assert configs.platform.device == "cpu"


@pytest.mark.parametrize(
    "flags,world_size,flag,fragment",
    [
        (["--tensor-model-parallel-size", "3"], 3, "--tensor-model-parallel-size",
         "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3"),
        (["--pipeline-model-parallel-size", "3"], 3, "--pipeline-model-parallel-size",
         "--num-layers 4 is not divisible by --pipeline-model-parallel-size 3"),
        (["--micro-batch-size", "2", "--global-batch-size", "6"], 2, "--global-batch-size",
         "6 is not divisible by --micro-batch-size 2 x data-parallel size 2 = 4"),
        (["--tokenizer-type", "BertWordPieceCase"], 1, "--tokenizer-type",
         "unknown value 'BertWordPieceCase'; choose one of GPTSentencePieceTokenizer"),
        (["--tensor-model-parallel-size", "2"], 3, "--tensor-model-parallel-size",
         "world size 3 is not divisible by TP x PP x CP = 2 x 1 x 1"),
        (["--group-query-attention", "--num-query-groups", "1", "--tensor-model-parallel-size",
          "2"], 2, "--num-query-groups", "1 query groups are not divisible"),
        (["--group-query-attention", "--num-query-groups", "3"], 1, "--num-query-groups",
         "--num-attention-heads 4 is not divisible by --num-query-groups 3"),
        (["--group-query-attention"], 1, "--num-query-groups", "needs --num-query-groups"),
        (["--hidden-size", "66"], 1, "--num-attention-heads",
         "--hidden-size 66 is not divisible by --num-attention-heads 4"),
        (["--max-position-embeddings", "16"], 1, "--max-position-embeddings",
         "16 is smaller than --seq-length 32"),
        (["--tokenizer-type", "SentencePieceTokenizer"], 1, "--tokenizer-model",
         "SentencePieceTokenizer needs --tokenizer-model PATH"),
        (["--lr-decay-style", "wavy"], 1, "--lr-decay-style", "unknown value 'wavy'"),
        (["--save-interval", "10"], 1, "--save-interval", "needs --save DIR"),
        (["--device", "tpu"], 1, "--device", "unknown value 'tpu'"),
        (["--ckpt-format", "torch"], 1, "--ckpt-format", "unknown value 'torch'"),
        (["--min-lr", "1", "--lr", "0.1"], 1, "--min-lr", "1.0 is above --lr 0.1"),
        (["--use-rope-scaling"], 1, "--use-rope-scaling",
         "only applies to --position-embedding-type rope"),
        (["--rope-scaling-factor", "32"], 1, "--rope-scaling-factor",
         "only applies with --use-rope-scaling"),
        (["--model-vocab-size", "0"], 1, "--model-vocab-size", "must be positive"),
        (["--context-parallel-size", "2"], 2, "--context-parallel-size",
         "2 is not supported: batches are not split per context-parallel rank"),
    ],
)  # fmt: skip
def test_validation_errors_name_the_flag(flags, world_size, flag, fragment):
    with pytest.raises(ConfigError) as error:
        parse(*flags, world_size=world_size)
    assert error.value.flag == flag
    assert fragment in str(error.value)
    assert str(error.value).startswith(flag)


def test_missing_required_flag():
    with pytest.raises(ConfigError, match="--num-layers: is required"):
        parse_args(["--vocab-size", "8"], world_size=1, exit_on_error=False)


@pytest.mark.skipif(transformer_engine_available(), reason="Transformer Engine is installed")
def test_transformer_engine_requested_without_it():
    with pytest.raises(ConfigError, match="--transformer-impl: transformer_engine was requested"):
        parse("--transformer-impl", "transformer_engine")


def test_bad_flag_exits_with_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*MODEL, "--tensor-model-parallel-size", "3"], world_size=3)
    assert exit_info.value.code == 2
    assert "--tensor-model-parallel-size" in capsys.readouterr().err


def test_sequence_parallel_needs_tensor_parallel():
    assert parse("--sequence-parallel").parallel.sequence_parallel is False
    configs = parse("--sequence-parallel", "--tensor-model-parallel-size", "2", world_size=2)
    assert configs.parallel.sequence_parallel is True


def test_swiglu_ffn_default_matches_megatron():
    model = ModelConfig(num_layers=1, hidden_size=256, num_attention_heads=4, seq_length=8)
    assert model.ffn_size() == 1024
    swiglu = ModelConfig(
        num_layers=1, hidden_size=256, num_attention_heads=4, seq_length=8, swiglu=True
    )
    assert swiglu.ffn_size() == 640  # int(4 * 256 * 2 / 3 / 64) * 64


SIP = ["--data-path", "corpus", "--judge-oracle-data", "demo", "--rewriter-oracle-data", "demo"]


def parse_sip(*flags):
    from megatron_sip.train_sip import SIPJobConfig

    return parse_args([*MODEL, *SIP, *flags], SIPJobConfig, world_size=1, exit_on_error=False)


@pytest.mark.parametrize(
    "flags,flag,fragment",
    [
        (["--sip-loss", "sft_rewrite", "--sip-num-rollouts", "4"], "--sip-num-rollouts",
         "--sip-loss sft_rewrite samples no rollouts"),
        (["--sip-loss", "sft_rewrite", "--sip-temperature", "0.7"], "--sip-temperature",
         "--sip-loss sft_rewrite samples no rollouts"),
        (["--sip-loss", "sft_rewrite"], "--judge-oracle-data",
         "--sip-loss sft_rewrite builds no judge"),
        (["--sip-loss", "rf_nll", "--sip-dpo-beta", "0.5"], "--sip-dpo-beta",
         "--sip-loss rf_nll uses no reference model"),
        (["--sip-loss", "rf_nll", "--sip-ref-ema-decay", "0.5"], "--sip-ref-ema-decay",
         "uses no reference model"),
        (["--rewriter-store", "r.jsonl"], "--rewriter-oracle-data",
         "--rewriter-store reads the rewrites: no rewriter is built"),
        (["--colocate-offload"], "--colocate-offload", "no colocated (megatron) judge"),
        (["--sip-loss", "ppo"], "--sip-loss", "unknown value 'ppo'; choose one of online_dpo"),
    ],
)  # fmt: skip
def test_sip_refuses_flags_its_objective_would_ignore(flags, flag, fragment):
    """A flag accepted and then ignored is a defect: each objective refuses the settings of
    components it does not build."""
    with pytest.raises(ConfigError) as error:
        parse_sip(*flags)
    assert error.value.flag == flag
    assert fragment in str(error.value)


def test_sip_objectives_accept_their_own_flags():
    from megatron_sip.train_sip import SIPJobConfig

    assert parse_sip("--sip-num-rollouts", "4", "--sip-dpo-beta", "0.5").sip.sip_dpo_beta == 0.5
    rf_nll = parse_sip("--sip-loss", "rf_nll", "--sip-num-rollouts", "2")
    assert rf_nll.objective.name == "rf_nll"
    flags = [*MODEL, "--data-path", "c", "--rewriter-oracle-data", "d"]
    sft = parse_args(
        [*flags, "--sip-loss", "sft_rewrite", "--sip-nll-weight", "0.1"],
        SIPJobConfig,
        world_size=1,
        exit_on_error=False,
    )
    assert not sft.objective.needs_judge and sft.sip.sip_nll_weight == 0.1


def test_role_flags_of_another_backend_are_refused():
    from megatron_sip.roles.config import JudgeConfig, RewriterConfig, build_judge, build_rewriter

    with pytest.raises(ConfigError, match="--judge-url: is only read by --judge-backend openai"):
        build_judge(JudgeConfig(judge_oracle_data="demo", judge_url="http://x"))
    with pytest.raises(ConfigError, match="--judge-prompt-dir: is only read by"):
        build_judge(JudgeConfig(judge_oracle_data="demo", judge_prompt_dir="p"))
    with pytest.raises(ConfigError, match="--rewriter-max-tokens: is only read by"):
        build_rewriter(RewriterConfig(rewriter_oracle_data="demo", rewriter_max_tokens=64))
    # Required settings are checked when the role is built, not when flags are parsed.
    JudgeConfig(judge_backend="megatron")
    with pytest.raises(ConfigError, match="--judge-load: --judge-backend megatron needs"):
        build_judge(JudgeConfig(judge_backend="megatron"))
    with pytest.raises(ConfigError, match="--judge-oracle-data: --judge-backend oracle needs"):
        build_judge(JudgeConfig())


@pytest.mark.parametrize(
    "flags,flag,fragment",
    [
        (["--train-iters", "10", "--train-samples", "100"], "--train-samples",
         "give --train-iters or --train-samples, not both"),
        (["--train-iters", "10", "--lr-decay-samples", "100"], "--lr-decay-samples",
         "needs --train-samples"),
        (["--train-samples", "100", "--lr-warmup-iters", "2"], "--lr-warmup-iters",
         "use its -samples form"),
        (["--train-iters", "10", "--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"],
         "--lr-warmup-iters", "give --lr-warmup-fraction or this flag, not both"),
        (["--train-iters", "10", "--lr-decay-style", "WSD"], "--lr-wsd-decay-iters",
         "WSD needs the length of its decay phase"),
        (["--train-iters", "10", "--lr-wsd-decay-iters", "2"], "--lr-wsd-decay-iters",
         "only applies to --lr-decay-style WSD"),
        (["--train-iters", "10", "--lr-wsd-decay-style", "wavy"], "--lr-wsd-decay-style",
         "unknown value 'wavy'"),
        (["--train-iters", "10", "--decoupled-min-lr", "1e-5"], "--decoupled-min-lr",
         "only applies with --decoupled-lr"),
        (["--train-iters", "10", "--rampup-batch-size", "16", "16", "100"],
         "--rampup-batch-size", "needs --train-samples"),
        (["--train-samples", "100", "--rampup-batch-size", "16", "16", "100"],
         "--rampup-batch-size", "not implemented here"),
        (["--fp16", "--bf16"], "--fp16", "not both"),
        (["--loss-scale", "1024"], "--loss-scale", "only applies to --fp16"),
        (["--hysteresis", "4"], "--hysteresis", "only applies to --fp16"),
        (["--grad-reduce-in-bf16"], "--grad-reduce-in-bf16", "only applies to --bf16"),
        (["--overlap-param-gather", "--overlap-grad-reduce"], "--overlap-param-gather",
         "needs --use-distributed-optimizer"),
        (["--overlap-param-gather", "--use-distributed-optimizer"], "--overlap-param-gather",
         "needs --overlap-grad-reduce"),
        (["--mock-data", "--data-path", "corpus"], "--mock-data", "not both"),
        (["--mock-data", "--dataloader-type", "cyclic"], "--dataloader-type",
         "cyclic is not implemented here"),
        (["--mock-data"], "--train-iters", "give --train-iters or --train-samples"),
        (["--train-iters", "10"], "--data-path", "or --mock-data"),
    ],
)  # fmt: skip
def test_training_and_data_flag_errors(flags, flag, fragment):
    from megatron_sip.pretrain import PretrainConfig

    with pytest.raises(ConfigError) as error:
        parse_args([*MODEL, *flags], PretrainConfig, world_size=1, exit_on_error=False)
    assert error.value.flag == flag
    assert fragment in str(error.value)


def test_megatron_lm_training_and_data_flags_parse():
    from megatron_sip.pretrain import PretrainConfig

    config = parse_args(
        [*MODEL, "--mock-data", "--train-samples", "1000", "--lr-warmup-samples", "100",
         "--lr-decay-samples", "900", "--lr-decay-style", "WSD", "--lr-wsd-decay-samples", "200",
         "--lr-wsd-decay-style", "cosine", "--lr-warmup-init", "1e-6", "--decoupled-lr", "5e-4",
         "--decoupled-min-lr", "5e-5", "--calculate-per-token-loss", "--bf16",
         "--grad-reduce-in-bf16", "--use-distributed-optimizer", "--overlap-grad-reduce",
         "--overlap-param-gather", "--no-mmap-bin-files",
         "--no-create-attention-mask-in-dataloader", "--dataloader-type", "single"],
        PretrainConfig, world_size=1, exit_on_error=False,
    )  # fmt: skip
    training, data = config.training, config.data
    assert (training.train_samples, training.train_iters) == (1000, None)
    assert (training.lr_decay_style, training.lr_wsd_decay_style) == ("WSD", "cosine")
    assert training.calculate_per_token_loss and training.overlap_param_gather
    assert training.grad_reduce_in_bf16 and training.decoupled_min_lr == 5e-5
    assert data.mock_data and not data.mmap_bin_files
    assert not data.create_attention_mask_in_dataloader
    fp16 = parse_args(
        [*MODEL, "--train-iters", "10", "--mock-data", "--fp16", "--initial-loss-scale", "65536",
         "--min-loss-scale", "2", "--loss-scale-window", "500", "--hysteresis", "1"],
        PretrainConfig, world_size=1, exit_on_error=False,
    ).training  # fmt: skip
    assert fp16.fp16 and fp16.initial_loss_scale == 65536 and fp16.min_loss_scale == 2
    assert (fp16.loss_scale_window, fp16.hysteresis) == (500, 1)
    # Megatron-LM's defaults.
    defaults = parse().training
    assert (defaults.eval_iters, defaults.hysteresis) == (100, 2)
    assert (defaults.initial_loss_scale, defaults.loss_scale_window) == (2**32, 1000)


def test_model_vocab_size_sizes_the_embedding():
    from megatron_sip.data.config import TokenizerConfig, embedding_vocab_size

    null = dict(tokenizer_type="NullTokenizer", vocab_size=255)
    assert embedding_vocab_size(TokenizerConfig(**null), 256, 2) == 256
    rows = TokenizerConfig(**null, model_vocab_size=320)
    assert embedding_vocab_size(rows, 256, 1) == 384 and embedding_vocab_size(rows, 256, 2) == 512
    with pytest.raises(ConfigError, match="--model-vocab-size: 200 is smaller than the tokenizer"):
        embedding_vocab_size(TokenizerConfig(**null, model_vocab_size=200), 256, 1)
