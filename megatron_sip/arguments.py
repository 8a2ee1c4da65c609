"""Megatron-style command-line flags, derived from the config dataclasses.

Every setting is a field of a config dataclass with a docstring under it (as in Megatron-Core's
``TransformerConfig``). This module turns each field into a ``--kebab-case`` flag whose help is that
docstring, so flag, help text and config cannot drift apart. Entry points call :func:`parse_args`;
library code receives the config objects, never the parsed namespace.

A flags file can be passed as ``@path``: one or more flags per line, ``#`` starts a comment.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import logging
import shlex
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence

from megatron_sip.data.config import TokenizerConfig
from megatron_sip.errors import ConfigError
from megatron_sip.initialize import ParallelConfig, world_size_from_env
from megatron_sip.models.checkpointing import CheckpointConfig, checkpoint_arg_values
from megatron_sip.models.config import ModelConfig
from megatron_sip.platform import PlatformConfig, resolve_device
from megatron_sip.training.config import TrainingConfig


@dataclasses.dataclass
class LaunchConfig:
    """Where a job runs: the device and the parallel layout (tools that build no model of
    their own, such as evaluation and launch checks, need only these)."""

    platform: PlatformConfig
    parallel: ParallelConfig


@dataclasses.dataclass
class JobConfig(LaunchConfig):
    """The settings of every megatron-sip training job, one config dataclass per group of flags.
    Entry points that need more (data, SIP, judge, rewriter) subclass it with more groups;
    :func:`parse_args` fills one instance from the command line, so every setting has one typed
    home."""

    model: ModelConfig
    tokenizer: TokenizerConfig
    training: TrainingConfig
    checkpoint: CheckpointConfig

    def validate(self, world_size: int) -> None:
        """Checks that need more than one group (each group checks its own fields); a subclass
        extends it for its own groups."""
        validate_layout(self.parallel, self.model, self.training, world_size)


def config_groups(job: type) -> dict[str, type]:
    """Group name -> config class of a job config class (its fields, in order)."""
    hints = typing.get_type_hints(job)
    return {field.name: hints[field.name] for field in dataclasses.fields(job)}


# --------------------------------------------------------------------------------------------
# dataclass -> flags
# --------------------------------------------------------------------------------------------


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields (``x: int = 1`` then ``\"\"\"doc\"\"\"``)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def flag_name(field: dataclasses.Field) -> str:
    """``tensor_model_parallel_size`` -> ``--tensor-model-parallel-size``."""
    return field.metadata.get("flag", "--" + field.name.replace("_", "-"))


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _parser_for(tp):
    """(argparse type, nargs, choices) for a field type."""
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        values = typing.get_args(tp)
        return type(values[0]), None, values
    if origin in (list, tuple, Sequence):
        (item,) = typing.get_args(tp)[:1]
        return _unwrap_optional(item), "+", None
    if tp in (int, float, str):
        return tp, None, None
    raise TypeError(f"no flag parser for field type {tp!r}")


def _default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """Adds one flag per field of ``cls`` to an argument group named ``title``."""
    group = parser.add_argument_group(title)
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init or field.metadata.get("no_flag"):
            continue
        help_text = docs.get(field.name, "").replace("%", "%%")
        tp, default = hints[field.name], _default(field)
        if _unwrap_optional(tp) is bool:
            # Off by default: `--flag` turns it on; on by default: `--no-flag` turns it off.
            flag = flag_name(field) if not default else "--no-" + flag_name(field)[2:]
            action = "store_false" if default else "store_true"
            group.add_argument(flag, dest=field.name, action=action, help=help_text)
            continue
        arg_type, nargs, choices = _parser_for(tp)
        if "choices" in field.metadata:  # a callable: choices from a table (e.g. objectives)
            choices = tuple(field.metadata["choices"]())
        metavar = field.name.upper()
        if choices:
            # Checked by the config itself, so the error names the flag and the fix.
            metavar = "{" + ",".join(map(str, choices)) + "}"
        group.add_argument(
            flag_name(field),
            dest=field.name,
            type=arg_type,
            nargs=nargs,
            default=default,
            metavar=metavar,
            help=help_text,
        )


def config_from_namespace(cls: type, namespace: argparse.Namespace):
    """Builds ``cls`` from the parsed flags (its ``__post_init__`` validates each field)."""
    values = {
        f.name: getattr(namespace, f.name)
        for f in dataclasses.fields(cls)
        if f.init and hasattr(namespace, f.name)
    }
    return cls(**values)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the entry point's docstring as written."""


class FlagsFileParser(argparse.ArgumentParser):
    """An argument parser whose ``@path`` flags files hold shell-quoted flags, any number per
    line, ``#`` comments allowed (construct it with ``fromfile_prefix_chars="@"``)."""

    def convert_arg_line_to_args(self, arg_line: str) -> list[str]:
        return shlex.split(arg_line, comments=True)


def build_parser(groups: Mapping[str, type], description: str | None = None):
    parser = FlagsFileParser(
        description=description,
        fromfile_prefix_chars="@",
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    seen: dict[str, str] = {}
    for title, cls in groups.items():
        for field in dataclasses.fields(cls):
            if field.name in seen:
                raise TypeError(
                    f"field {field.name} is declared by both {seen[field.name]} and {title}"
                )
            seen[field.name] = title
        add_config_arguments(parser, cls, title)
    return parser


# --------------------------------------------------------------------------------------------
# parsing and cross-config validation
# --------------------------------------------------------------------------------------------


J = typing.TypeVar("J")


def parse_args(
    argv: Sequence[str] | None = None,
    job: type[J] = JobConfig,
    *,
    world_size: int | None = None,
    description: str | None = None,
    exit_on_error: bool = True,
    for_this_device: bool = True,
) -> J:
    """Parses Megatron-style flags into ``job``, a dataclass whose fields are config groups
    (:class:`JobConfig` or a subclass; any dataclass of config dataclasses works), then runs its
    ``validate(world_size)`` when it has one.

    ``world_size`` (default: from the launcher's environment) is needed to check the parallel
    layout and batch sizes. With ``for_this_device`` the flags the resolved ``--device`` cannot
    run are refused too (:func:`check_device`); without it the flags are checked alone (a job
    prepared here to run on another machine). With ``exit_on_error`` a bad setting prints its
    message and exits 2, as argparse does; otherwise :class:`ConfigError` is raised.
    """
    groups = config_groups(job)
    parser = build_parser(groups, description)
    namespace = parser.parse_args(argv)
    try:
        if getattr(namespace, "use_checkpoint_args", False):
            checkpoint = config_from_namespace(CheckpointConfig, namespace)
            vars(namespace).update(checkpoint_arg_values(checkpoint, vars(namespace)))
        config = job(
            **{title: config_from_namespace(cls, namespace) for title, cls in groups.items()}
        )
        if hasattr(config, "validate"):
            config.validate(world_size if world_size is not None else world_size_from_env())
        if for_this_device:
            check_device(config)
    except ConfigError as error:
        if exit_on_error:
            parser.error(str(error))
        raise
    return config


def check_device(job) -> None:
    """Refuses, before anything starts, the flags that cannot run on the job's device (FP8 or
    nsys profiling on the CPU, ...): every config group with a ``check_device(device)`` method
    is asked, with ``--device`` resolved as :func:`megatron_sip.platform.activate` will."""
    platform_config = getattr(job, "platform", None)
    if platform_config is None:
        return
    device = resolve_device(platform_config.device)
    for field in dataclasses.fields(job):
        group = getattr(job, field.name)
        if hasattr(group, "check_device"):
            group.check_device(device)


def flags_file_lines(config) -> list[str]:
    """The command-line flags that rebuild ``config`` (one config dataclass): one line per
    setting that differs from its default, for a flags file (``@path``)."""
    lines = []
    for field in dataclasses.fields(config):
        value, default = getattr(config, field.name), _default(field)
        if not field.init or field.metadata.get("no_flag") or value == default:
            continue
        flag = flag_name(field)
        if isinstance(value, bool):
            lines.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            lines.append(shlex.join([flag, *map(str, value)]))
        elif value is None:
            raise ValueError(f"{flag}: a default of {default!r} cannot be unset in a flags file")
        else:
            lines.append(shlex.join([flag, str(value)]))
    return lines


def set_flags(config, names: Sequence[str] | None = None) -> list[str]:
    """The flags of ``config`` (one config dataclass) whose values differ from their defaults,
    among the fields ``names`` (default: all)."""
    flags = []
    for field in dataclasses.fields(config):
        if not field.init or (names is not None and field.name not in names):
            continue
        if getattr(config, field.name) != _default(field):
            flags.append(flag_name(field))
    return flags


def reject_set_flags(config, names: Sequence[str] | None, reason: str) -> None:
    """A flag that is accepted and then ignored is a defect: raises :class:`ConfigError` for the
    first of ``names`` (default: every field) set to a non-default value, with ``reason``."""
    flags = set_flags(config, names)
    if flags:
        raise ConfigError(flags[0], f"{reason}, so this flag would be ignored; drop it")


def reject_validation_flags(training, reason: str) -> None:
    """For trainers without a validation split: refuses --eval-interval and a positive
    --eval-iters (``--eval-iters 0``, evaluation off, is what they do anyway)."""
    names = ["eval_interval"] + (["eval_iters"] if training.eval_iters else [])
    reject_set_flags(training, names, reason)


def validate_layout(
    parallel: ParallelConfig | None,
    model: ModelConfig | None,
    training: TrainingConfig | None,
    world_size: int,
) -> None:
    """The parallel layout against the world size, the model shape and the batch sizes."""
    if parallel is None:
        return
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    data_parallel_size = parallel.data_parallel_size(world_size)
    if parallel.sequence_parallel and tp == 1:
        # As Megatron-LM: sequence parallelism is a no-op without tensor parallelism.
        logging.getLogger(__name__).warning(
            "--sequence-parallel: disabled, --tensor-model-parallel-size is 1"
        )
        parallel.sequence_parallel = False
    if model is not None:
        _validate_model_layout(model, tp, pp)
    if training is not None:
        per_step = training.micro_batch_size * data_parallel_size
        if training.global_batch_size is not None and training.global_batch_size % per_step:
            raise ConfigError(
                "--global-batch-size",
                f"{training.global_batch_size} is not divisible by --micro-batch-size "
                f"{training.micro_batch_size} x data-parallel size {data_parallel_size} = "
                f"{per_step}; use a multiple of {per_step}",
            )


def _validate_model_layout(model: ModelConfig, tp: int, pp: int) -> None:
    if model.num_attention_heads % tp:
        raise ConfigError(
            "--tensor-model-parallel-size",
            f"--num-attention-heads {model.num_attention_heads} is not divisible by "
            f"--tensor-model-parallel-size {tp}; pick a TP size that divides the number of heads",
        )
    groups = model.query_groups()
    if groups % tp:
        raise ConfigError(
            "--num-query-groups",
            f"{groups} query groups are not divisible by --tensor-model-parallel-size {tp}; "
            "pick a TP size that divides --num-query-groups",
        )
    if model.num_layers % pp:
        raise ConfigError(
            "--pipeline-model-parallel-size",
            f"--num-layers {model.num_layers} is not divisible by "
            f"--pipeline-model-parallel-size {pp}; pick a PP size that divides the layer count",
        )
