"""Per-token target log-probs straight from the last hidden states and the output layer's weight,
without ever holding the logits of all tokens.

``fused_linear_target_log_probs(hidden, weight, targets)`` equals
``target_log_probs(hidden @ weight.t(), targets)`` (``megatron_sip/ops/dpo.py``), but the logits
``[N, V_local]`` are only ever built ``chunk_size`` tokens at a time:

* forward: for each chunk of tokens, ``logits = hidden[chunk] @ weight.t()`` (in the hidden's
  dtype) feeds the DPO op's ``stats`` kernel (per-row max, sum of exp, target logit) and is
  dropped. Once every row has its statistics, the tensor-parallel shards are combined with the
  same two all-reduces as ``dpo._combine``, issued once over all rows rather than once per chunk.
  Saved for backward: hidden, weight, targets and the per-row max and log-sum (2N floats, kept
  apart for precision, see ``dpo.py``), never the logits.
* backward: each chunk's logits are recomputed, the ``backward`` kernel turns them into
  ``grad_logits`` (the logits' dtype), and that chunk contributes
  ``grad_hidden[chunk] = grad_logits @ weight`` and ``grad_weight += grad_logits.t() @ hidden``
  (summed over chunks in fp32, cast to the weight's dtype at the end).

Extra memory is O(chunk_size x V_local) for one chunk's logits and their gradient, plus the
outputs (the log-probs, the row statistics, and the gradients with an fp32 accumulator for the
weight's).
The price is one extra ``[N, H] x [H, V_local]`` matmul in backward (the recomputation).

Tensor parallelism: ``weight`` is this rank's vocabulary shard ``[vocab_start, vocab_start +
V_local)`` of a column-parallel output layer and ``hidden`` is replicated over the TP group. Each
rank's ``grad_hidden`` is then only its shard's part of the sum over the vocabulary, so it is
all-reduced (SUM) over ``group``, exactly as Megatron's ``ColumnParallelLinear`` does for its
input. ``grad_weight`` is local to the shard and needs no collective.
"""

from __future__ import annotations

import torch

from megatron_sip.ops.dpo import IMPLEMENTATIONS, _combine, _kernels, _TorchKernels


def _tp_world_size(group) -> int:
    if group is None:
        return 1
    return torch.distributed.get_world_size(group)


def _chunks(rows: int, chunk_size: int):
    for start in range(0, rows, chunk_size):
        yield start, min(start + chunk_size, rows)


class _FusedLinearTargetLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_start, group, chunk_size, implementation):
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        flat_targets = targets.reshape(-1).long().contiguous()
        kernels = _kernels(implementation, hidden.device)
        # float64 (gradcheck) keeps float64 statistics with the torch reference, as in dpo.py;
        # fp32 and bf16 accumulate their statistics in fp32.
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        if dtype == torch.float64:
            kernels = _TorchKernels
        vocab_start = int(vocab_start)

        # Statistics of every row first, so that the TP collectives run once over all rows
        # instead of 2 x (number of chunks) small latency-bound all-reduces.
        stats = torch.empty(flat_hidden.shape[0], 3, dtype=dtype, device=hidden.device)
        for start, end in _chunks(flat_hidden.shape[0], chunk_size):
            # mm returns a fresh contiguous [rows, V_local] tensor, as the kernels require.
            logits = flat_hidden[start:end] @ weight.t()
            # Row slices of the contiguous [N, 3] / [N] tensors are contiguous views, so the
            # kernel writes this chunk's rows in place.
            kernels.stats(logits, flat_targets[start:end], vocab_start, stats[start:end])
            del logits  # only one chunk's logits alive at a time
        maximum, log_sum, target = _combine(stats, group)

        ctx.save_for_backward(flat_hidden, weight, flat_targets, maximum, log_sum)
        ctx.kernels, ctx.vocab_start, ctx.group = kernels, vocab_start, group
        ctx.chunk_size, ctx.hidden_shape = chunk_size, hidden.shape
        return ((target - maximum) - log_sum).view(targets.shape)

    @staticmethod
    def backward(ctx, grad_output):
        flat_hidden, weight, targets, maximum, log_sum = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad = grad_output.reshape(-1).to(maximum.dtype).contiguous()

        grad_hidden = torch.empty_like(flat_hidden) if need_hidden else None
        # The weight's gradient is a sum over all chunks: accumulate it in fp32 (fp64 for
        # gradcheck) so that bf16 weights do not lose precision with every chunk added.
        accumulator = None
        if need_weight:
            accumulator = torch.zeros(weight.shape, dtype=maximum.dtype, device=weight.device)

        if need_hidden or need_weight:
            for start, end in _chunks(flat_hidden.shape[0], ctx.chunk_size):
                chunk = flat_hidden[start:end]
                # Recomputed instead of saved: saving them is the O(N x V_local) memory this op
                # exists to avoid.
                logits = chunk @ weight.t()
                grad_logits = torch.empty_like(logits)
                ctx.kernels.backward(
                    logits,
                    targets[start:end],
                    ctx.vocab_start,
                    maximum[start:end],
                    log_sum[start:end],
                    grad[start:end],
                    grad_logits,
                )
                del logits
                if need_hidden:
                    grad_hidden[start:end] = grad_logits @ weight
                if need_weight:
                    if grad_logits.dtype == accumulator.dtype:
                        accumulator.addmm_(grad_logits.t(), chunk)
                    else:
                        # bf16 / fp16: the matmul accumulates in fp32 internally and rounds the
                        # chunk's contribution once; the sum over chunks stays in fp32. (Casting
                        # the operands to fp32 first would copy the chunk's gradient in fp32
                        # and give up the fast low-precision matmul.)
                        accumulator += grad_logits.t() @ chunk
                del grad_logits

        if need_hidden and _tp_world_size(ctx.group) > 1:
            # The hidden states are replicated over the TP ranks and each rank only saw its
            # vocabulary shard: the full gradient is the sum of the shards' parts.
            torch.distributed.all_reduce(grad_hidden, group=ctx.group)

        grad_weight = accumulator.to(weight.dtype) if need_weight else None
        if need_hidden:
            grad_hidden = grad_hidden.view(ctx.hidden_shape)
        return grad_hidden, grad_weight, None, None, None, None, None


def fused_linear_target_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int = 0,
    group=None,
    chunk_size: int = 1024,
    implementation: str = "auto",
) -> torch.Tensor:
    """log p(targets) per token, fp32 (fp64 for fp64 inputs), shape of ``targets``, for the logits
    ``hidden @ weight.t()`` computed ``chunk_size`` tokens at a time and never stored.

    ``hidden [..., H]`` (leading dimensions those of ``targets``; replicated over the TP group),
    ``weight [V_local, H]`` this rank's vocabulary shard starting at ``vocab_start`` (same dtype
    and device as ``hidden``), ``group`` the tensor-parallel group (None: the full vocabulary is
    local). ``implementation`` picks the statistics / backward kernels as in
    :func:`megatron_sip.ops.dpo.target_log_probs`. Differentiable in ``hidden`` and ``weight``.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} does not match weight {tuple(weight.shape)} "
            "([..., H] and [V_local, H] expected)"
        )
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} does not match targets {tuple(targets.shape)}"
        )
    if hidden.dtype != weight.dtype or hidden.device != weight.device:
        raise ValueError(
            f"hidden ({hidden.dtype}, {hidden.device}) and weight ({weight.dtype}, "
            f"{weight.device}) must share dtype and device"
        )
    return _FusedLinearTargetLogProbs.apply(
        hidden, weight, targets, vocab_start, group, int(chunk_size), implementation
    )
