"""lm-evaluation-harness model for megatron-sip checkpoints: ``--model megatron_sip``.

    torchrun --nproc-per-node 2 -m megatron_sip.eval.harness --model megatron_sip \\
        --model_args load=runs/demo/sip,tensor_model_parallel_size=2 \\
        --tasks arc_easy --include_path my_tasks/ --batch_size 16

Importing this module registers the model with lm-eval's registry (``megatron_sip.eval.harness``
is lm-eval's own command line with it imported; lm-eval 0.4 has no plugin discovery for models).

One process per rank, any TP/PP: the checkpoint's saved settings give the model and tokenizer, as
for every other megatron-sip tool. lm-eval sees one process: every rank receives all requests,
the data-parallel ranks each compute every DP-th batch, and the results are gathered so that
every rank returns all of them (only global rank 0 writes files, see ``harness``).

- ``loglikelihood``: the continuation's summed log-prob after the context, and whether greedy
  decoding would produce it (each of its tokens is an argmax). Context and continuation follow
  lm-eval's Hugging Face convention: trailing spaces of the context move to the continuation,
  the pair is encoded whole (with the tokenizer's BOS, if it adds one) and split at the
  context's length, an empty context becomes the prefix token (BOS where the tokenizer adds
  one, else end-of-document, what precedes a document in Megatron's indexed datasets), and a
  pair longer than the model's positions loses context tokens on the left.
- ``loglikelihood_rolling``: a document's log-prob in disjoint windows of the model's length
  (lm-eval's rolling windows; the first token is predicted from the prefix token).
- ``generate_until``: greedy (or sampled, with ``do_sample`` and ``temperature``) decoding of at
  most ``max_gen_toks`` tokens with the rollout engine, cut at the first ``until`` string.

Log-probs are over the tokenizer's vocabulary (the embedding table's padding rows left out, so
they equal a Hugging Face export's), computed on the vocabulary shards without gathering the
logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megatron_sip.inference.pipeline import broadcast_from_last_stage, pipeline_forward
from megatron_sip.inference.sampling import SamplingConfig
from megatron_sip.inference.scoring import unpack_candidates
from megatron_sip.initialize import ParallelConfig, destroy_distributed, initialize_distributed
from megatron_sip.ops.dpo import target_log_probs

MODEL_NAME = "megatron_sip"


@dataclasses.dataclass(frozen=True)
class ScoredContinuation:
    log_prob: float
    is_greedy: bool


def vocab_parallel_max_log_probs(selected: torch.Tensor, tp_group) -> torch.Tensor:
    """The largest log-prob at each position, ``[..., V/TP]`` logits -> ``[...]``, over the
    vocabulary split across ``tp_group`` (None: the whole vocabulary is local)."""
    selected = selected.float()
    peak = selected.max(-1).values
    split = tp_group is not None and tp_group.size() > 1
    if split:
        torch.distributed.all_reduce(peak, torch.distributed.ReduceOp.MAX, group=tp_group)
    total = (selected - peak.unsqueeze(-1)).exp().sum(-1)
    if split:
        torch.distributed.all_reduce(total, group=tp_group)
    return -total.log()


@torch.no_grad()
def score_continuations(
    module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    vocab_size: Optional[int] = None,
    pad_id: int = 0,
) -> list[ScoredContinuation]:
    """``(context tokens, continuation tokens)`` pairs scored in one forward pass (collective
    over the model-parallel ranks; every rank returns the same scores). One row per pair,
    right-padded; the causal layout is exact for every row. ``vocab_size``: ids at and above it
    (the embedding table's padding) are left out of the softmax (None: none are)."""
    from megatron_sip.models.checkpointing import unwrap_model

    groups = unwrap_model(module).pg_collection
    device = next(module.parameters()).device
    packed = unpack_candidates([c for c, _ in pairs], [[t] for _, t in pairs], pad_id).to(device)
    rows = packed.targets.shape[0]
    # The last position only holds the longest row's last token, which predicts nothing: a pair
    # of max_length + 1 tokens runs in max_length positions (as Hugging Face models run it).
    logits = pipeline_forward(
        module,
        packed.tokens[:, :-1],
        packed.position_ids[:, :-1],
        attention_mask=packed.attention_mask[..., :-1, :-1],
    )
    result = torch.zeros(rows, 2, dtype=torch.float64, device=device)
    if logits is not None:
        index = packed.predict_from.view(rows, -1)
        selected = logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).float()
        shard = selected.shape[-1]
        vocab_start = groups.tp.rank() * shard if groups.tp.size() > 1 else 0
        if vocab_size is not None:
            ids = torch.arange(vocab_start, vocab_start + shard, device=device)
            selected = selected.masked_fill(ids >= vocab_size, float("-inf"))
        tp_group = groups.tp if groups.tp.size() > 1 else None
        targets = packed.targets.view(rows, -1)
        token_log_probs = target_log_probs(
            selected, targets, vocab_start=vocab_start, group=tp_group
        )
        peak = vocab_parallel_max_log_probs(selected, tp_group)
        mask = packed.mask.view(rows, -1) > 0
        # Greedy: no token of the continuation has a likelier alternative (ties count as greedy).
        behind = ((peak - token_log_probs) > 1e-6) & mask
        result[:, 0] = (token_log_probs.double() * mask).sum(-1)
        result[:, 1] = (~behind.any(-1)).double()
    result = broadcast_from_last_stage(result, groups.pp)
    return [ScoredContinuation(float(lp), bool(g)) for lp, g in result.tolist()]


@register_model(MODEL_NAME)
class MegatronSIPLM(LM):
    """A megatron-sip checkpoint as an lm-eval model (see the module)."""

    def __init__(
        self,
        load: str,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        batch_size: int | str = 16,
        max_length: Optional[int] = None,
        device: Optional[str] = None,
        model_args: Optional[str] = None,
        seed: int = 1234,
        max_batch_size: Optional[int] = None,
        context=None,
    ):
        """``load``: checkpoint directory; ``model_args``: a flags file of model-shape and
        tokenizer flags for checkpoints without saved settings; ``max_length``: positions per
        request (default and upper bound: the model's --seq-length); ``device``: lm-eval's
        ``--device`` (cpu, cuda, cuda:N; default: the platform's choice); ``seed``: of sampled
        generation; ``context``: a ``DistributedContext`` already built with this layout (a
        tool that evaluates several checkpoints in one job; the caller then owns it), else the
        model initialises the process group and tears it down on ``close``."""
        super().__init__()
        from megatron_sip.roles.megatron_backend import RoleModel

        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise ValueError(
                f"--batch_size {batch_size!r}: megatron_sip takes a number of requests per "
                "forward pass (lm-eval's automatic batch sizing is not supported)"
            )
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
        del max_batch_size  # lm-eval passes it for its automatic batch sizing only
        parallel = ParallelConfig(
            tensor_model_parallel_size=int(tensor_model_parallel_size),
            pipeline_model_parallel_size=int(pipeline_model_parallel_size),
        )
        # lm-eval's --device: cpu, cuda or cuda:N (each rank takes its local GPU); none: auto.
        device = device.split(":")[0] if device else "auto"
        self._owns_context = context is None
        self.context = context or initialize_distributed(parallel, device, int(seed))
        self.role = RoleModel(load, parallel, self.context.pg_collection, model_args)
        self.module = self.role.module
        self.tokenizer = self.role.tokenizer
        bos = getattr(self.tokenizer, "bos", -1)
        self._adds_bos = bos is not None and bos >= 0 and self.tokenizer.tokenize("0")[:1] == [bos]
        self.seed = int(seed)
        limit = self.role.model_config.seq_length
        self.max_length = int(max_length or limit)
        if not 1 < self.max_length <= limit:
            raise ValueError(
                f"max_length={max_length}: must be in [2, {limit}] (the model's --seq-length)"
            )

    # -- lm-eval sees one process; data parallelism is internal ------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is: BOS where the tokenizer starts every text with it (as the
        model was trained), else end-of-document (what precedes a document in Megatron's
        indexed datasets)."""
        return self.tokenizer.bos if self._adds_bos else self.tokenizer.eod

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    def close(self) -> None:
        if self._owns_context:
            destroy_distributed()

    def _encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids as the tokenizer makes them (with its BOS, if it adds one), or without
        the BOS (``special=False``)."""
        ids = list(self.tokenizer.tokenize(text)) if text else []
        if not special and self._adds_bos and ids[:1] == [self.tokenizer.bos]:
            ids = ids[1:]
        return ids

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation, context = context[-spaces:] + continuation, context[:-spaces]
        if not context:
            tokens = self._encode(continuation, special=False)
            if tokens[:1] == [self.prefix_token_id]:
                return tokens[:1], tokens[1:]
            return [self.prefix_token_id], tokens
        whole = self._encode(context + continuation)
        context_tokens = self._encode(context)
        return whole[: len(context_tokens)], whole[len(context_tokens) :]

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """The pair cut on the left to ``max_length`` + 1 tokens (the last one is only
        predicted, so the model runs ``max_length`` positions)."""
        if not continuation:
            raise ValueError(f"a loglikelihood request has an empty continuation: {context!r:.80}")
        if len(continuation) > self.max_length:
            raise ValueError(
                f"a continuation of {len(continuation)} tokens exceeds max_length "
                f"{self.max_length}: it cannot be scored in one window"
            )
        return context[-(self.max_length + 1 - len(continuation)) :], continuation

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[ScoredContinuation]:
        """Every pair scored; batches of similar length, every DP-th one on each DP rank."""
        order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i])))
        batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        rank, size = self.context.data_parallel_rank, self.context.data_parallel_size
        mine: dict[int, ScoredContinuation] = {}
        for number, members in enumerate(batches):
            if number % size == rank:
                scores = score_continuations(
                    self.module, [pairs[i] for i in members], self.tokenizer.vocab_size
                )
                mine.update(zip(members, scores))
        return [value for _, value in sorted(self._gather(mine).items())]

    def _gather(self, mine: dict[int, Any]) -> dict[int, Any]:
        if self.context.data_parallel_size == 1:
            return mine
        parts: list[Any] = [None] * self.context.data_parallel_size
        torch.distributed.all_gather_object(parts, mine, group=self.context.pg_collection.dp)
        return {key: value for part in parts for key, value in part.items()}

    # -- the three request types ----------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._fit(*self._encode_pair(*request.args)) for request in requests]
        return [(s.log_prob, s.is_greedy) for s in self._score(pairs)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owners = [], []
        for owner, request in enumerate(requests):
            (text,) = request.args
            windows = get_rolling_token_windows(
                token_list=self._encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, score in zip(owners, self._score(pairs)):
            totals[owner] += score.log_prob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from megatron_sip.inference.generation import generate

        outputs: dict[int, str] = {}
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            context, kwargs = request.args
            key = repr(sorted(_generation_settings(kwargs).items()))
            groups.setdefault(key, []).append(index)
        rank, size = self.context.data_parallel_rank, self.context.data_parallel_size
        number = 0
        for members in groups.values():
            context, kwargs = requests[members[0]].args
            settings = _generation_settings(kwargs)
            until, new_tokens = settings["until"], settings["max_gen_toks"]
            room = self.max_length - new_tokens
            if room < 1:
                raise ValueError(
                    f"max_gen_toks {new_tokens} leaves no room for a context in max_length "
                    f"{self.max_length}"
                )
            sampling = SamplingConfig(sip_temperature=settings["temperature"])
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                number += 1
                if (number - 1) % size != rank:
                    continue
                prefixes = [
                    (self._encode(requests[i].args[0]) or [self.prefix_token_id])[-room:]
                    for i in batch
                ]
                rollouts = generate(
                    self.module,
                    prefixes,
                    num_samples=1,
                    num_tokens=new_tokens,
                    sampling=sampling,
                    seed=self.seed + number,
                    eod=self.eot_token_id,
                    vocab_size=self.tokenizer.vocab_size,
                )
                for i, samples in zip(batch, rollouts.as_candidates()):
                    tokens = [t for t in samples[0] if t != self.eot_token_id]
                    outputs[i] = _cut(self.tokenizer.detokenize(tokens), until)
        gathered = self._gather(outputs)
        return [gathered[i] for i in range(len(requests))]


def _generation_settings(kwargs: dict) -> dict:
    """lm-eval's generation kwargs as this model applies them; an unknown one is an error
    rather than silently ignored."""
    kwargs = dict(kwargs or {})
    until = kwargs.pop("until", None) or []
    if isinstance(until, str):
        until = [until]
    settings = {
        "until": tuple(until),
        "max_gen_toks": int(kwargs.pop("max_gen_toks", 256)),
        "temperature": 0.0,
    }
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
    settings["temperature"] = temperature if do_sample else 0.0
    if kwargs:
        raise ValueError(
            f"megatron_sip: generation settings {sorted(kwargs)} are not supported "
            "(until, max_gen_toks, do_sample and temperature are)"
        )
    return settings


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
