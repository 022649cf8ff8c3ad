"""What a transformer's softmaxes say about its stability, as pure tensor maths.

* **Attention**: the logits a softmax over keys receives (``q . k`` times the call's scale, plus
  whatever the model adds before its softmax: a position bias, an additive mask) and the
  distribution it makes. Two numbers matter (Dehghani et al. 2023; Wortsman et al. 2023): the
  largest |logit|, which grows without bound when queries and keys grow together, and the
  entropy of each query's attention, which falls towards 0 (one-hot attention) as it does.
  Masked keys (probability exactly 0) are left out of the largest |logit|, so an additive mask
  of -1e4 or ``finfo.min`` is not read as a logit; a query with no key left is left out of the
  entropy.
* **Output logits**: log Z = logsumexp of a classifier's or LM head's logits per position. With
  no term holding it, it drifts far from 0 (PaLM; Wortsman et al. 2023), and z-loss is that term.

Everything stays on the device and never touches the model's own tensors: a logging step reads,
the output and its gradient are the model's.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Elements of one chunk of attention logits reduced at once: bounds the extra memory of a
# logging step to about 4 fp32 copies of this (256 MiB), whatever the sequence length.
CHUNK_ELEMENTS = 1 << 24


def _as_batches(x: torch.Tensor, heads: int | None) -> torch.Tensor:
    """``x`` as ``(batch, heads, queries, last)``: 4-D and more fold their leading dims into the
    batch; ``(B*H, L, S)`` unfolds with ``heads``; fewer dims are one head of one sample."""
    if x.dim() >= 4:
        return x.reshape(-1, *x.shape[-3:])
    if x.dim() == 3 and heads and x.shape[0] % heads == 0:
        return x.reshape(x.shape[0] // heads, heads, *x.shape[1:])
    while x.dim() < 4:
        x = x.unsqueeze(0)
    return x


def _reduce(chunks: Iterator[torch.Tensor], heads: int, device: torch.device) -> tuple:
    """(largest |logit| over unmasked keys, per head: the sum of its queries' entropies and how
    many queries) over chunks of fp32 logits ``(b, heads, L, S)``."""
    per_head_sum = torch.zeros(heads, dtype=torch.float64, device=device)
    per_head_count = torch.zeros(heads, dtype=torch.float64, device=device)
    top = torch.zeros((), dtype=torch.float32, device=device)
    for z in chunks:
        p = torch.softmax(z, dim=-1)
        live = p > 0
        if z.numel():
            top = torch.maximum(top, torch.where(live, z.abs(), 0.0).amax())
        entropy = -torch.special.xlogy(p, p).sum(-1)  # per query: (b, heads, L)
        ok = live.any(-1) & entropy.isfinite()
        per_head_sum += torch.where(ok, entropy, 0.0).sum((0, 2)).double()
        per_head_count += ok.sum((0, 2)).double()
    return top, per_head_sum, per_head_count


def _step(sample: torch.Size) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, sample.numel()))


def softmax_rows(logits: torch.Tensor, heads: int | None = None) -> tuple:
    """A softmax over the last dim of ``logits`` (``(..., H, L, S)``, or ``(B*H, L, S)`` with
    ``heads=H``) reduced on the device: (largest |logit| over unmasked keys, per head the sum of
    its queries' entropies, per head how many queries). Masked keys are those whose probability
    is exactly 0 (an additive mask, or ``-inf``); a query with no key left is not counted."""
    x = _as_batches(logits.detach(), heads)
    n = _step(x.shape[1:])
    chunks = (x[i : i + n].float() for i in range(0, x.shape[0], n))
    return _reduce(chunks, x.shape[1], x.device)


def sdpa_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> tuple:
    """:func:`softmax_rows` of the logits ``F.scaled_dot_product_attention`` puts through its
    softmax, by its own conventions: ``scale`` defaults to ``1/sqrt(E)``; a boolean mask keeps
    True; a float mask is added; ``is_causal`` keeps the lower-left triangle; each of ``H_k``
    key heads serves ``H_q / H_k`` query heads (grouped-query attention, ``enable_gqa``). Computed a few samples
    at a time, never the whole attention matrix at once."""
    q, k = _as_batches(query.detach(), None), _as_batches(key.detach(), None)
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    factor = scale if scale is not None else q.shape[-1] ** -0.5
    length, keys = q.shape[-2], k.shape[-2]
    mask = None
    if attn_mask is not None:
        mask = attn_mask.detach()
        mask = mask.reshape(-1, *mask.shape[-3:]) if mask.dim() >= 4 else mask
    causal = None
    if is_causal:
        causal = torch.ones(length, keys, dtype=torch.bool, device=q.device).tril()
    n = _step(torch.Size((q.shape[1], length, keys)))

    def chunks() -> Iterator[torch.Tensor]:
        for i in range(0, q.shape[0], n):
            z = (q[i : i + n].float() @ k[i : i + n].float().transpose(-2, -1)) * factor
            if causal is not None:
                z = z.masked_fill(~causal, -torch.inf)
            if mask is not None:
                m = mask[i : i + n] if mask.dim() == 4 and mask.shape[0] == q.shape[0] else mask
                z = z.masked_fill(~m, -torch.inf) if m.dtype == torch.bool else z + m.float()
            yield z

    return _reduce(chunks(), q.shape[1], q.device)


def log_z_rows(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log Z = logsumexp over the last dim of a head's output, per position: (sum over
    positions, how many, largest |log Z|), fp32 device scalars; non-finite positions left out
    (the non-finite rules report them)."""
    z = torch.logsumexp(logits.detach().float(), dim=-1).reshape(-1)
    ok = z.isfinite()
    total = torch.where(ok, z, 0.0).sum()
    top = torch.where(ok, z.abs(), 0.0).amax() if z.numel() else z.new_zeros(())
    return total, ok.sum(), top
