"""Megatron-LM's logging, profiling and memory flags: their names, defaults and refusals, the
TensorBoard tags they write (Megatron-LM's names), manual garbage collection and the PyTorch
profiler, through the training loop and one real pretraining run."""

from __future__ import annotations

import gc
import math
from types import SimpleNamespace

import pytest
import torch

from megatron_sip.arguments import parse_args
from megatron_sip.errors import ConfigError
from megatron_sip.models.checkpointing import CheckpointConfig
from megatron_sip.pretrain import PretrainConfig
from megatron_sip.training.config import TrainingConfig
from megatron_sip.training.loop import StepOutput, Trainer, TrainState, describe_losses, train
from megatron_sip.training.metrics import (
    LoggingConfig,
    MetricWriter,
    flops_per_sample,
    params_l2_norm,
)

from .pretrain_utils import (
    NULL_TOKENIZER,
    TINY_ARGS,
    preprocess,
    run_pretrain,
    write_counting_corpus,
)

BASE = [TINY_ARGS, *NULL_TOKENIZER, "--mock-data", "--train-iters", "2"]


def logging_config(*flags: str, for_this_device: bool = False) -> LoggingConfig:
    """The logging settings of these flags, checked for the device only when asked."""
    job = parse_args(
        [*BASE, *flags], PretrainConfig, world_size=1, exit_on_error=False,
        for_this_device=for_this_device,
    )  # fmt: skip
    return job.logging


def test_flags_have_megatron_names_and_defaults():
    config = logging_config()
    assert config == LoggingConfig()
    assert (config.tensorboard_log_interval, config.tensorboard_queue_size) == (1, 1000)
    assert config.log_loss_scale_to_tensorboard and config.manual_gc_eval
    assert (config.profile_step_start, config.profile_step_end, config.profile_ranks) == (
        10,
        12,
        [0],
    )
    config = logging_config(
        "--no-log-loss-scale-to-tensorboard", "--manual-gc", "--manual-gc-interval", "5",
        "--no-manual-gc-eval", "--empty-unused-memory-level", "2", "--profile",
        "--profile-step-start", "4", "--profile-step-end", "6", "--profile-ranks", "0", "1",
        "--log-throughput", "--log-params-norm", "--log-memory-to-tensorboard",
        "--log-timers-to-tensorboard", "--log-validation-ppl-to-tensorboard",
        "--log-world-size-to-tensorboard", "--tensorboard-log-interval", "3",
        "--tensorboard-queue-size", "7", "--wandb-project", "p", "--wandb-exp-name", "e",
        "--wandb-save-dir", "w", "--wandb-entity", "t",
    )  # fmt: skip
    assert not config.log_loss_scale_to_tensorboard and not config.manual_gc_eval
    assert (config.manual_gc_interval, config.empty_unused_memory_level) == (5, 2)
    assert (config.profile_step_start, config.profile_step_end, config.profile_ranks) == (
        4,
        6,
        [0, 1],
    )
    assert (config.wandb_save_dir, config.tensorboard_queue_size) == ("w", 7)


@pytest.mark.parametrize(
    "flags,flag,message",
    [
        (["--manual-gc-interval", "2"], "--manual-gc-interval", "only applies with --manual-gc"),
        (["--no-manual-gc-eval"], "--no-manual-gc-eval", "only applies with --manual-gc"),
        (["--use-pytorch-profiler"], "--use-pytorch-profiler", "only applies with --profile"),
        (["--profile", "--profile-step-start", "6", "--profile-step-end", "6"],
         "--profile-step-end", "must be above"),
        (["--profile", "--use-pytorch-profiler"], "--use-pytorch-profiler", "--tensorboard-dir"),
        (["--empty-unused-memory-level", "3"], "--empty-unused-memory-level", "3"),
        (["--wandb-save-dir", "w"], "--wandb-save-dir", "only applies with --wandb-project"),
    ],
)  # fmt: skip
def test_inconsistent_flags_are_refused(flags, flag, message):
    with pytest.raises(ConfigError, match=message) as error:
        logging_config(*flags)
    assert error.value.flag == flag


def test_gpu_only_flags_are_refused_on_cpu():
    # The Llama-3 8B example's flags: --empty-unused-memory-level 1, nsys --profile; refused
    # while parsing for this (CPU) machine, and by the settings' own check.
    with pytest.raises(ConfigError, match="no allocator cache"):
        logging_config("--empty-unused-memory-level", "1", for_this_device=True)
    with pytest.raises(ConfigError, match="no allocator cache") as error:
        logging_config("--empty-unused-memory-level", "1").check_device("cpu")
    assert error.value.flag == "--empty-unused-memory-level"
    nsys = logging_config("--profile", "--profile-step-start", "4", "--profile-step-end", "6")
    with pytest.raises(ConfigError, match="nsys.*--use-pytorch-profiler") as error:
        nsys.check_device("cpu")
    assert error.value.flag == "--profile"
    nsys.check_device("cuda")
    logging_config("--empty-unused-memory-level", "1").check_device("cuda")
    logging_config("--profile", "--use-pytorch-profiler", "--tensorboard-dir", "tb").check_device(
        "cpu"
    )


def test_missing_wandb_is_an_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="pip install wandb") as error:
        MetricWriter(LoggingConfig(wandb_project="p"))
    assert error.value.flag == "--wandb-project"


class Recorder(MetricWriter):
    def __init__(self, config: LoggingConfig):
        super().__init__(config)
        self.values: dict[int, dict] = {}

    def tensorboard_scalars(self, values, step):
        self.values.setdefault(step, {}).update(values)


def scripted_trainer(observed: list, flops_per_step=None):
    """Steps that do a little torch work and record whether the collector was enabled."""

    def step(state: TrainState) -> StepOutput:
        observed.append(gc.isenabled())
        x = torch.randn(64, 64)
        return StepOutput({"lm loss": float((x @ x).abs().mean()), "loss-scale": 1.0})

    return Trainer(
        step=step,
        save=lambda state: None,
        learning_rate=lambda: 1e-3,
        samples_per_step=8,
        evaluate=lambda: {"lm loss": 2.0},
        describe=describe_losses,
        flops_per_step=flops_per_step,
    )


def test_loop_writes_megatron_tags_as_flagged(capsys):
    config = LoggingConfig(
        tensorboard_log_interval=2,
        log_timers_to_tensorboard=True,
        log_throughput=True,
        log_validation_ppl_to_tensorboard=True,
        log_memory_to_tensorboard=True,
        log_world_size_to_tensorboard=True,
        log_loss_scale_to_tensorboard=False,
    )
    writer = Recorder(config)
    training = TrainingConfig(train_iters=4, log_interval=4, eval_interval=4, eval_iters=1)
    train(scripted_trainer([], flops_per_step=3e12), TrainState(), training,
          CheckpointConfig(), writer)  # fmt: skip
    values = writer.values
    assert 1 not in values and 3 not in values  # --tensorboard-log-interval 2
    step = values[2]
    assert {"lm loss", "learning-rate", "batch-size", "world-size"} <= set(step)
    assert "loss-scale" not in step  # --no-log-loss-scale-to-tensorboard
    assert step["batch-size"] == 8 and step["world-size"] == 1
    assert step["mem-rss-bytes"] > 0 and step["mem-max-rss-bytes"] >= step["mem-rss-bytes"]
    assert not any(tag.startswith("mem-") and "rss" not in tag for tag in step)  # no CUDA tags
    # "vs samples" twins at the consumed-sample count, Megatron-LM's flat tags only.
    assert set(values[16]) == {
        "lm loss vs samples", "learning-rate vs samples", "batch-size vs samples",
        "world-size vs samples",
    }  # fmt: skip
    assert values[16]["lm loss vs samples"] == step["lm loss"]
    # Timers at the --log-interval step; throughput is FLOPs / time / ranks in TFLOP/s.
    last = values[4]
    assert last["throughput"] == pytest.approx(3.0 / last["iteration-time"])
    assert "iteration-time" not in step
    assert last["lm loss validation"] == 2.0
    assert last["lm loss validation ppl"] == pytest.approx(math.exp(2.0))
    assert values[32]["lm loss validation vs samples"] == 2.0
    assert "throughput per rank (TFLOP/s/rank)" in capsys.readouterr().out


def test_throughput_and_params_norm_need_what_they_measure():
    writer = Recorder(LoggingConfig(log_throughput=True))
    with pytest.raises(ConfigError, match="FLOP count") as error:
        train(scripted_trainer([]), TrainState(), TrainingConfig(train_iters=1), CheckpointConfig(),
              writer)  # fmt: skip
    assert error.value.flag == "--log-throughput"


def test_manual_gc_disables_the_collector_and_collects_on_its_interval(monkeypatch):
    collections = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda generation=2: collections.append(generation))
    observed = []
    config = LoggingConfig(manual_gc=True, manual_gc_interval=2)
    training = TrainingConfig(train_iters=4, eval_interval=3, eval_iters=1)
    try:
        train(scripted_trainer(observed), TrainState(), training, CheckpointConfig(),
              Recorder(config))  # fmt: skip
    finally:
        monkeypatch.setattr(gc, "collect", real_collect)
    assert observed == [False] * 4 and gc.isenabled()  # re-enabled on the way out
    # Start; evaluation at 3 (full before, generation 0 after); steps 2 and 4; final evaluation.
    assert collections == [2, 2, 2, 0, 2, 2, 0]
    collections.clear()
    observed.clear()
    monkeypatch.setattr(gc, "collect", lambda generation=2: collections.append(generation))
    train(scripted_trainer(observed), TrainState(), TrainingConfig(train_iters=2, eval_iters=0),
          CheckpointConfig(), Recorder(LoggingConfig()))  # fmt: skip
    assert observed == [True, True] and collections == []


def test_pytorch_profiler_writes_a_trace_to_the_tensorboard_dir(tmp_path):
    config = LoggingConfig(
        tensorboard_dir=str(tmp_path),
        profile=True,
        use_pytorch_profiler=True,
        profile_step_start=1,
        profile_step_end=2,
    )
    train(scripted_trainer([]), TrainState(), TrainingConfig(train_iters=3, eval_iters=0),
          CheckpointConfig(), Recorder(config))  # fmt: skip
    traces = list(tmp_path.glob("*.pt.trace.json"))
    assert len(traces) == 1 and "aten::mm" in traces[0].read_text()


def test_params_norm_counts_each_parameter_once():
    single = SimpleNamespace(size=lambda: 1, rank=lambda: 0)
    model = torch.nn.Linear(3, 4)
    model.pg_collection = SimpleNamespace(tp=single, mp=single)
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm().item()
    assert params_l2_norm([model]) == pytest.approx(expected)
    model.bias.shared = True  # a second copy of a tied weight is not counted again
    assert params_l2_norm([model]) == pytest.approx(model.weight.detach().norm().item())


def test_flops_follow_megatron_lm_formula():
    config = SimpleNamespace(hidden_size=4096, kv_channels=128, num_attention_heads=32,
                             num_query_groups=8, gated_linear_unit=True, ffn_hidden_size=14336,
                             num_layers=32)  # fmt: skip
    # Megatron-LM's num_floating_point_operations for Llama-3 8B at seq 8192, batch 1.
    s, h, v = 8192, 4096, 128256
    expected = (
        1
        * s
        * (
            3 * 2 * h * (14336 * 3) * 32
            + 32 * 3 * 2 * (h * (4096 + 1024 + 1024) + 4096 * s / 2 * 2 + 4096 * h)
            + 3 * 2 * h * v
        )
    )
    assert flops_per_sample(config, s, v) == pytest.approx(expected)


@pytest.mark.slow
def test_pretraining_writes_megatron_tags(tmp_path):
    """One real run with every honoured logging flag: Megatron-LM's tag names in the event
    files, params norm and throughput on the console, a profiler trace."""
    write_counting_corpus(tmp_path / "corpus.jsonl", documents=60)
    data = preprocess(tmp_path / "corpus.jsonl", tmp_path / "corpus")
    tb = tmp_path / "tb"
    output = run_pretrain(
        1, "--data-path", data, "--split", "90,10,0", "--train-iters", "3", "--log-interval", "1",
        "--eval-interval", "3", "--eval-iters", "1", "--tensorboard-dir", str(tb),
        "--log-throughput", "--log-timers-to-tensorboard", "--log-params-norm",
        "--log-memory-to-tensorboard", "--log-validation-ppl-to-tensorboard",
        "--log-world-size-to-tensorboard", "--manual-gc", "--manual-gc-interval", "1",
        "--profile", "--use-pytorch-profiler", "--profile-step-start", "1",
        "--profile-step-end", "2",
    )  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tb))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    megatron = {"lm loss", "learning-rate", "batch-size", "loss-scale", "grad-norm",
                "params-norm", "world-size", "iteration-time", "throughput",
                "lm loss validation", "lm loss validation ppl", "mem-rss-bytes"}  # fmt: skip
    assert megatron <= tags
    assert {"lm loss vs samples", "params-norm vs samples", "lm loss validation vs samples"} <= tags
    assert not any(tag.startswith(("train/lm", "validation/")) for tag in tags)
    assert "params norm" in output and "throughput per rank (TFLOP/s/rank)" in output
    assert list(tb.glob("*.pt.trace.json"))
