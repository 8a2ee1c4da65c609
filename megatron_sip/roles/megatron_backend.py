"""Colocated judge and rewriter: Megatron GPT checkpoints on the policy's ranks and topology.

A role model is built once, in inference mode, from a checkpoint whose saved model and tokenizer
settings (written by ``megatron_sip.pretrain``) describe it; flags can override them. It shares the
policy's tensor/pipeline-parallel groups. The judge reads its verdict from the probabilities of two
fixed verdict tokens at the answer position, in one forward pass over a batch of prompts (safety:
the least P(safe) over runs of a candidate's sentences, see ``PromptedJudge``); the rewriter
generates with the rollout engine (greedy by default).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Optional

import torch

from megatron_sip import platform
from megatron_sip.data.config import TokenizerConfig, embedding_vocab_size
from megatron_sip.data.tokenizers import build_tokenizer
from megatron_sip.errors import ConfigError
from megatron_sip.inference.generation import generate
from megatron_sip.inference.pipeline import broadcast_from_last_stage, pipeline_forward
from megatron_sip.inference.sampling import SamplingConfig
from megatron_sip.initialize import ParallelConfig
from megatron_sip.models.checkpointing import load_checkpoint, saved_model_settings
from megatron_sip.models.config import ModelConfig
from megatron_sip.models.gpt import build_gpt_model, transformer_config
from megatron_sip.platform import torch_device
from megatron_sip.roles.base import Rewriter, Score, _check_lengths
from megatron_sip.roles.config import RoleContext, require_setting
from megatron_sip.roles.prompts import (
    SAFETY_WINDOW_SENTENCES,
    PromptedJudge,
    PromptSet,
    Template,
    encode_prompt,
    load_pack,
    stop_token_ids,
    verdict_token_ids,
)

logger = logging.getLogger(__name__)


def model_settings_from_file(path: str) -> tuple[ModelConfig, TokenizerConfig]:
    """Model-shape and tokenizer flags from a flags file (the role's own ``--num-layers ...``),
    for checkpoints that store no settings, or to override them."""
    from megatron_sip.arguments import build_parser, config_from_namespace

    parser = build_parser({"model": ModelConfig, "tokenizer": TokenizerConfig})
    namespace, unknown = parser.parse_known_args([f"@{path}"])
    if unknown:
        raise ValueError(f"{path}: not model or tokenizer flags: {' '.join(unknown)}")
    return config_from_namespace(ModelConfig, namespace), config_from_namespace(
        TokenizerConfig, namespace
    )


class RoleModel:
    """A frozen Megatron GPT model for inference, with its tokenizer."""

    def __init__(
        self,
        load_dir: str,
        parallel: ParallelConfig,
        pg_collection,
        model_args_file: Optional[str] = None,
    ):
        """The checkpoint under ``load_dir`` split over ``parallel``'s layout and the groups of
        ``pg_collection`` (the policy's); its shape and tokenizer from the checkpoint's saved
        settings, or from ``model_args_file`` (a flags file) when given."""
        if model_args_file is not None:
            model, tokenizer = model_settings_from_file(model_args_file)
        else:
            model, tokenizer = saved_model_settings(load_dir)
        self.load_dir = load_dir
        self.model_config = model
        self.tokenizer = build_tokenizer(tokenizer)
        self.vocab_size = embedding_vocab_size(
            tokenizer, self.tokenizer.vocab_size, parallel.tensor_model_parallel_size
        )
        config = transformer_config(model, parallel)
        self.module = build_gpt_model(model, config, self.vocab_size, pg_collection)
        load_checkpoint(load_dir, [self.module], load_optim=False, load_rng=False)
        self.module.eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.device = torch_device()

    def verdict_ids(self, template: Template) -> tuple[int, int]:
        """The ids of a template's verdicts at its answer position (single tokens of the role's
        tokenizer, else ValueError naming the checkpoint and the template)."""
        try:
            return verdict_token_ids(template, self.tokenizer)
        except ValueError as error:
            raise ValueError(f"judge {self.load_dir}: {error}") from None

    def encode(self, prompt, limit: Optional[int] = None) -> list[int]:
        """Token ids of a rendered prompt (text, or a chat prompt rendered by the tokenizer's
        chat template), keeping the last ``limit`` (the answer position is at the end)."""
        limit = limit or self.model_config.seq_length
        try:
            return encode_prompt(prompt, self.tokenizer)[-limit:]
        except ValueError as error:
            raise ValueError(f"{self.load_dir}: {error}") from None

    @torch.no_grad()
    def next_token_log_probs(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Log-softmax over the vocabulary after each prompt's last token, ``[B, V]``, on
        every rank. Prompts are right-padded, which causal attention makes exact."""
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.as_tensor(prompt, device=self.device)
        positions = torch.arange(tokens.shape[1], device=self.device).expand_as(tokens)
        logits = pipeline_forward(self.module, tokens, positions, runtime_gather_output=True)
        out = torch.zeros(len(prompts), self.vocab_size, device=self.device)
        if logits is not None:
            last = logits[torch.arange(len(prompts), device=self.device), lengths - 1].float()
            last[:, self.tokenizer.vocab_size :] = float("-inf")
            out = torch.log_softmax(last, dim=-1)
        return broadcast_from_last_stage(out.contiguous(), self.module.pg_collection.pp)

    def offload(self) -> None:
        """Moves the weights to CPU memory while the role is idle (GPU only)."""
        if self.device.type == "cuda":
            self.module.to("cpu")

    def onload(self) -> None:
        if self.device.type == "cuda":
            self.module.to(self.device)


def verdict_probability(log_probs: torch.Tensor, positive: int, negative: int) -> torch.Tensor:
    """P(positive verdict), renormalised over the two verdict tokens."""
    pair = torch.stack([log_probs[:, positive], log_probs[:, negative]], dim=-1)
    return torch.softmax(pair, dim=-1)[:, 0]


class MegatronJudge(PromptedJudge):
    collective = True  # every model-parallel rank runs the same forward passes

    def __init__(
        self,
        role: RoleModel,
        prompts: PromptSet,
        *,
        max_prefix_chars: int = 2000,
        micro_batch_size: int = 8,
        offload: bool = False,
        safety_window_sentences: int = SAFETY_WINDOW_SENTENCES,
    ):
        super().__init__(prompts, max_prefix_chars, safety_window_sentences)
        self.role = role
        self.micro_batch_size = micro_batch_size
        self.offload = offload
        self.identity = f"megatron:{role.load_dir}:{prompts.fingerprint()}"
        # Fail at start-up, not mid-training, when a verdict string is not one token (or the
        # tokenizer cannot render a chat pack).
        self.verdict_ids = {
            name: role.verdict_ids(prompts[name])
            for name in ("quality", "coherence", "safety", "factuality")
            if name in prompts.templates
        }

    def verdicts(self, name: str, prompts: Sequence[str]) -> list[Score]:
        """P(positive verdict) for rendered prompts, in the prompts' order. Each distinct prompt
        is run once (a safety call repeats the runs of sentences that candidates share), in
        micro-batches of prompts of similar length (less padding)."""
        positive, negative = self.verdict_ids[name]
        distinct: dict[tuple[int, ...], int] = {}
        rows = [distinct.setdefault(tuple(self.role.encode(p)), len(distinct)) for p in prompts]
        encoded = list(distinct)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        if self.offload:
            self.role.onload()
        scores = [0.0] * len(encoded)
        for start in range(0, len(order), self.micro_batch_size):
            batch = order[start : start + self.micro_batch_size]
            log_probs = self.role.next_token_log_probs([encoded[i] for i in batch])
            for i, score in zip(batch, verdict_probability(log_probs, positive, negative)):
                scores[i] = score.item()
        if self.offload:
            self.role.offload()
        return [scores[row] for row in rows]


class MegatronRewriter(Rewriter):
    collective = True

    def __init__(
        self,
        role: RoleModel,
        prompts: PromptSet,
        *,
        max_tokens: int = 128,
        max_prefix_chars: int = 2000,
        sampling: Optional[SamplingConfig] = None,
        seed: int = 0,
        offload: bool = False,
    ):
        self.role = role
        self.template: Template = prompts["rewrite"]
        self.stop = stop_token_ids(self.template, role.tokenizer)
        self.max_tokens = max_tokens
        self.max_prefix_chars = max_prefix_chars
        self.sampling = sampling or SamplingConfig(sip_temperature=0.0)
        self.seed = seed
        self.offload = offload

    def rewrite(self, prefixes: Sequence[str], suffixes: Sequence[str]) -> list[Optional[str]]:
        _check_lengths(prefixes, suffixes)
        if not prefixes:
            return []
        limit = self.role.model_config.seq_length - self.max_tokens
        prompts = [
            self.role.encode(self.template.render(self.max_prefix_chars, prefix=p, suffix=s), limit)
            for p, s in zip(prefixes, suffixes)
        ]
        if self.offload:
            self.role.onload()
        rollouts = generate(
            self.role.module,
            prompts,
            num_samples=1,
            num_tokens=self.max_tokens,
            sampling=self.sampling,
            seed=self.seed,
            eod=self.role.tokenizer.eod,
            stop=self.stop,
            vocab_size=self.role.tokenizer.vocab_size,
        )
        if self.offload:
            self.role.offload()
        texts = []
        for tokens, original in zip(rollouts.as_candidates(), suffixes):
            ids = [t for t in tokens[0] if t != self.role.tokenizer.eod]
            texts.append(self.template.rewrite_from(self.role.tokenizer.detokenize(ids), original))
        return texts


# -- builders (roles/config.py's backend table) -------------------------------------------------


def _role_model(load: str, model_args: Optional[str], context: RoleContext, flag: str) -> RoleModel:
    if context.offload and platform.active_device() != "cuda":
        raise ConfigError(
            "--colocate-offload", "only on GPU: on CPU the role's weights are in host memory"
        )
    return RoleModel(load, context.parallel, context.groups(flag), model_args_file=model_args)


def build_megatron_judge(config, context: RoleContext) -> MegatronJudge:
    """``--judge-backend megatron`` from a JudgeConfig."""
    require_setting(
        config.judge_load, "--judge-load", "--judge-backend", "megatron", "a checkpoint"
    )
    return MegatronJudge(
        _role_model(config.judge_load, config.judge_model_args, context, "--judge-backend"),
        load_pack(config.judge_prompt_dir, "--judge-prompt-dir"),
        max_prefix_chars=config.judge_max_prefix_chars,
        micro_batch_size=config.judge_micro_batch_size,
        safety_window_sentences=config.judge_safety_window_sentences,
        offload=context.offload,
    )


def build_megatron_rewriter(config, context: RoleContext) -> MegatronRewriter:
    """``--rewriter-backend megatron`` from a RewriterConfig."""
    require_setting(
        config.rewriter_load, "--rewriter-load", "--rewriter-backend", "megatron", "a checkpoint"
    )
    return MegatronRewriter(
        _role_model(
            config.rewriter_load, config.rewriter_model_args, context, "--rewriter-backend"
        ),
        load_pack(config.rewriter_prompt_dir, "--rewriter-prompt-dir"),
        max_tokens=config.rewriter_max_tokens,
        max_prefix_chars=config.rewriter_max_prefix_chars,
        offload=context.offload,
    )
