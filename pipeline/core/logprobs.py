"""Token log-probs and entropies from logits (or from hidden states), in bounded memory.

What: for each position, ``log pi(label)`` and the entropy ``H = -sum_a pi(a) log pi(a)`` of the
temperature-scaled distribution ``pi = softmax(z / T)``.

Why chunked: with a 150k vocabulary, one full ``N x V`` fp32 buffer is 0.6 MB per token; the naive
``log_softmax`` + ``exp`` + product chain keeps several of them alive at once. Here rows are processed
``chunk_size`` at a time, each chunk upcast to fp32 on its own, so the extra memory is
``O(chunk_size x V)``. Backward is a hand-written ``autograd.Function`` that recomputes each chunk's
softmax and writes that chunk's gradient straight into one preallocated gradient buffer, so backward
memory is one chunk of temporaries plus the input gradient autograd needs anyway. (Per-chunk
``torch.utils.checkpoint`` would also bound it, but slice-backward accumulation and the extra
autograd graph make it ~2x slower than this and, for the LM-head weight, double-buffer its
gradient.) Gradients, with ``s = z / T``, ``p = softmax(s)``:

    d log p_y / dz = (onehot(y) - p) / T
    d H / dz       = -p * (log p + H) / T

``logprobs_from_hidden`` goes one step further and never forms the full logits: it multiplies one
chunk of hidden states by the LM-head weight at a time (the "fused linear + cross-entropy" trick);
its backward recomputes the chunk's logits and accumulates ``dW += g^T h`` in place.

Entropy uses ``H = logsumexp(s) - sum_a p_a s_a``, one softmax buffer per chunk.

Deviations from verl: verl computes ``logprobs_from_logits`` and ``entropy_from_logits`` on the full
logits (optionally with flash-attn's cross-entropy kernel, optionally chunked for entropy only);
here both come from one pass, values are always fp32, and double backward is not supported.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _check(temperature: float, chunk_size: int) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _chunk_forward(
    z: Tensor, labels: Tensor, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor]:
    """(C, V) logits -> log-prob of ``labels`` (C,) and entropy (C,) (zeros if not wanted), fp32."""
    s = z.float()
    if temperature != 1.0:
        s = s / temperature
    lse = torch.logsumexp(s, dim=-1)
    logp = s.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    return logp, lse - (torch.softmax(s, dim=-1) * s).sum(-1)


def _chunk_grad(
    z: Tensor, labels: Tensor, ent: Tensor, g_lp: Tensor, g_ent: Tensor | None, temperature: float
):
    """d(sum g_lp * logp + g_ent * H) / dz for one (C, V) chunk, fp32."""
    s = z.float()
    if temperature != 1.0:
        s = s / temperature
    logp_all = torch.log_softmax(s, dim=-1)
    p = logp_all.exp()
    if g_ent is None:
        grad = p.mul_(-g_lp.unsqueeze(-1))
    else:  # -p * (g_lp + g_ent * (log p + H)), reusing logp_all's buffer
        grad = (
            logp_all.add_(ent.unsqueeze(-1)).mul_(g_ent.unsqueeze(-1)).add_(g_lp.unsqueeze(-1)).mul_(p).neg_()
        )
    grad.scatter_add_(-1, labels.unsqueeze(-1), g_lp.unsqueeze(-1))
    if temperature != 1.0:
        grad.div_(temperature)
    return grad


def _grads_or_none(g_lp: Tensor | None, g_ent: Tensor | None, like: Tensor, with_entropy: bool):
    g_lp = torch.zeros_like(like) if g_lp is None else g_lp.float()
    g_ent = None if (g_ent is None or not with_entropy) else g_ent.float()
    return g_lp, g_ent


class _LogitsLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, labels, temperature, chunk_size, with_entropy):
        lps, ents = [], []
        with torch.no_grad():
            for start in range(0, z.shape[0], chunk_size):
                lp, ent = _chunk_forward(
                    z[start : start + chunk_size],
                    labels[start : start + chunk_size],
                    temperature,
                    with_entropy,
                )
                lps.append(lp)
                ents.append(ent)
        logp, ent = _cat(lps, z), _cat(ents, z)
        ctx.save_for_backward(z, labels, ent)
        ctx.cfg = (temperature, chunk_size, with_entropy)
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        z, labels, ent = ctx.saved_tensors
        temperature, chunk_size, with_entropy = ctx.cfg
        g_lp, g_ent = _grads_or_none(g_lp, g_ent, ent, with_entropy)
        grad = torch.empty_like(z)
        for start in range(0, z.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            ge = None if g_ent is None else g_ent[sl]
            grad[sl] = _chunk_grad(z[sl], labels[sl], ent[sl], g_lp[sl], ge, temperature)
        return grad, None, None, None, None


class _HiddenLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_size, with_entropy):
        lps, ents = [], []
        with torch.no_grad():
            for start in range(0, hidden.shape[0], chunk_size):
                z = hidden[start : start + chunk_size] @ weight.t()
                lp, ent = _chunk_forward(z, labels[start : start + chunk_size], temperature, with_entropy)
                lps.append(lp)
                ents.append(ent)
        logp, ent = _cat(lps, hidden), _cat(ents, hidden)
        ctx.save_for_backward(hidden, weight, labels, ent)
        ctx.cfg = (temperature, chunk_size, with_entropy)
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, labels, ent = ctx.saved_tensors
        temperature, chunk_size, with_entropy = ctx.cfg
        g_lp, g_ent = _grads_or_none(g_lp, g_ent, ent, with_entropy)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for start in range(0, hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            h = hidden[sl]
            ge = None if g_ent is None else g_ent[sl]
            g = _chunk_grad(h @ weight.t(), labels[sl], ent[sl], g_lp[sl], ge, temperature).to(hidden.dtype)
            if need_h:
                grad_h[sl] = g @ weight
            if need_w:
                grad_w.addmm_(g.t().float(), h.float())
        return grad_h, (None if grad_w is None else grad_w.to(weight.dtype)), None, None, None, None


def logprobs_and_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``labels`` and token entropy from ``logits``, ``chunk_size`` rows at a time.

    Args:
        logits: (..., V), any float dtype; divided by ``temperature`` before the softmax.
        labels: (...), int64 token ids (same leading shape as ``logits``).
        temperature: sampling temperature T > 0 (must match the one used to generate).
        chunk_size: rows per chunk; extra memory is about ``4 * chunk_size * V * 4`` bytes.
        with_entropy: when False, skip the entropy (returned as None).

    Returns:
        ``(logprobs, entropy)``, both fp32 shaped like ``labels`` (entropy None if not requested).
        Differentiable w.r.t. ``logits`` (gradient in the dtype of ``logits``).
    """
    _check(temperature, chunk_size)
    lead = labels.shape
    if logits.shape[:-1] != lead:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(lead)} disagree on leading dims")
    flat_z = logits.reshape(-1, logits.shape[-1])
    logp, ent = _LogitsLogprobEntropy.apply(flat_z, labels.reshape(-1), temperature, chunk_size, with_entropy)
    return logp.reshape(lead), (ent.reshape(lead) if with_entropy else None)


def logprobs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Like :func:`logprobs_and_entropy` for ``logits = hidden @ weight.T``, never forming all N x V.

    Args:
        hidden: (N, D) final hidden states (after the last norm).
        weight: (V, D) LM-head weight (tied embeddings are fine; gradients flow to both inputs).
        labels: (N,) int64 token ids.

    Returns:
        ``(logprobs (N,), entropy (N,) or None)`` in fp32.
    """
    _check(temperature, chunk_size)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"need hidden (N, D) and weight (V, D); got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be (N,) = {tuple(hidden.shape[:1])}, got {tuple(labels.shape)}")
    logp, ent = _HiddenLogprobEntropy.apply(hidden, weight, labels, temperature, chunk_size, with_entropy)
    return logp, (ent if with_entropy else None)


def _cat(parts: list[Tensor], like: Tensor) -> Tensor:
    if not parts:  # zero rows
        return torch.zeros(0, dtype=torch.float32, device=like.device)
    return torch.cat(parts)


def naive_logprobs_and_entropy(
    logits: Tensor, labels: Tensor, *, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Reference: full ``log_softmax`` over (..., V) in fp32. For tests and benchmarks only."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logprobs = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy
