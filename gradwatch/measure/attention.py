"""What a transformer's softmaxes say about its stability, as pure tensor maths.

* **Attention**: the logits a softmax over keys receives (``q . k`` times the call's scale, plus
  whatever the model adds before its softmax: a position bias, an additive mask) and the
  distribution it makes. Two numbers matter (Dehghani et al. 2023; Wortsman et al. 2023): the
  largest logit, which grows without bound when queries and keys grow together, and the entropy
  of each query's attention, which falls towards 0 (one-hot attention) as it does. The largest
  logit is signed, as Megatron's max-attention-logit monitor and QK-clip take it: a mask only
  lowers logits (``-inf``, ``finfo.min``, -1e4, -100), so no masking convention can be read as
  a large logit. A query whose every key sits at -1e4 or below has no key left (left padding
  under a causal mask): it is left out of both numbers.
* **Output logits**: per position, log Z (the logsumexp of a classifier's or LM head's logits)
  and the logits' mean over classes, their level. The loss cannot see the level (it does not
  change when every logit moves by one constant), so nothing holds it; PaLM's z-loss holds
  log Z near 0 (Chowdhery et al. 2022; Wortsman et al. 2023).

Everything stays on the device, in fp32 with autocast off (a user's fp16 autocast would
overflow ``q @ k`` above 65504, exactly where the logits matter), a bounded block at a time
(at most :data:`CHUNK_ELEMENTS` logits, whatever the sequence length), and never touches the
model's own tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Logits reduced at once: a logging step's extra memory is a few fp32 copies of this (64 MiB
# each), whatever the batch, the heads or the sequence length.
CHUNK_ELEMENTS = 1 << 24
NO_KEY = -1e4  # a query whose largest logit is this low has every key masked


def _exact(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``t``'s device, where autocast exists."""
    try:
        return torch.autocast(t.device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def _as_batches(x: torch.Tensor, heads: int | None) -> torch.Tensor:
    """``x`` as ``(batch, heads, queries, last)``: 4-D and more fold their leading dims into the
    batch; ``(B*H, L, S)`` unfolds with ``heads``, other 3-D inputs are one head per sample."""
    if x.dim() >= 4:
        return x.reshape(-1, *x.shape[-3:])
    if x.dim() == 3:
        if heads and x.shape[0] % heads == 0:
            return x.reshape(x.shape[0] // heads, heads, *x.shape[1:])
        return x.unsqueeze(1)
    while x.dim() < 4:
        x = x.unsqueeze(0)
    return x


def _blocks(batch: int, heads: int, queries: int, keys: int) -> Iterator[tuple]:
    """(samples, heads, queries) slices covering ``(batch, heads, queries, keys)`` logits, each
    block at most CHUNK_ELEMENTS of them (one query row at least)."""
    per_sample = heads * queries * keys
    if per_sample <= CHUNK_ELEMENTS:  # whole samples at a time
        n = CHUNK_ELEMENTS // per_sample
        for b in range(0, batch, n):
            yield slice(b, b + n), slice(None), slice(None)
        return
    rows = max(1, CHUNK_ELEMENTS // keys)  # blocks of query rows, one head at a time
    for b in range(batch):
        for h in range(heads):
            for q in range(0, queries, rows):
                yield slice(b, b + 1), slice(h, h + 1), slice(q, q + rows)


def _reduce(blocks: Iterator[tuple[slice, torch.Tensor]], heads: int, device) -> tuple:
    """(largest logit of a query with a key left, per head: the sum of those queries' entropies
    and how many) over blocks of fp32 logits ``(b, h, L, S)``, each with its heads' slice."""
    per_head_sum = torch.zeros(heads, dtype=torch.float64, device=device)
    per_head_count = torch.zeros(heads, dtype=torch.float64, device=device)
    top = torch.full((), -torch.inf, dtype=torch.float32, device=device)
    for head_slice, z in blocks:
        if not z.numel():
            continue
        row_max = z.amax(-1)  # (b, h, L)
        keyed = row_max > NO_KEY
        top = torch.maximum(top, torch.where(keyed, row_max, -torch.inf).amax())
        p = torch.softmax(z, dim=-1)
        entropy = -torch.special.xlogy(p, p).sum(-1)
        ok = keyed & entropy.isfinite()
        per_head_sum[head_slice] += torch.where(ok, entropy, 0.0).sum((0, 2)).double()
        per_head_count[head_slice] += ok.sum((0, 2)).double()
    return top, per_head_sum, per_head_count


def softmax_rows(logits: torch.Tensor, heads: int | None = None) -> tuple:
    """A softmax over the last dim of ``logits`` (``(..., H, L, S)``, or ``(B*H, L, S)`` with
    ``heads=H``) reduced on the device: (largest logit of a query with a key left, per head the
    sum of those queries' entropies, per head how many)."""
    x = _as_batches(logits.detach(), heads)
    b, h, length, keys = x.shape
    with _exact(x):
        blocks = ((hs, x[bs, hs, qs].float()) for bs, hs, qs in _blocks(b, h, length, keys))
        return _reduce(blocks, h, x.device)


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
    key heads serves ``H_q / H_k`` query heads (grouped-query attention, ``enable_gqa``).
    Formed a block at a time, never the whole attention matrix at once."""
    q, k = _as_batches(query.detach(), None), _as_batches(key.detach(), None)
    group = q.shape[1] // k.shape[1]  # query heads per key head
    factor = scale if scale is not None else q.shape[-1] ** -0.5
    b, h, length, keys = q.shape[0], q.shape[1], q.shape[-2], k.shape[-2]
    mask = None
    if attn_mask is not None:  # a broadcast view: no copy
        m = attn_mask.detach()
        mask = (m.reshape(-1, *m.shape[-3:]) if m.dim() > 4 else m).expand(b, h, length, keys)
    causal = None
    if is_causal:
        causal = torch.ones(length, keys, dtype=torch.bool, device=q.device).tril()

    def blocks() -> Iterator[tuple[slice, torch.Tensor]]:
        for bs, hs, qs in _blocks(b, h, length, keys):
            if hs == slice(None):  # whole samples: every key head, repeated for its group
                kk = k[bs].float()
                kk = kk.repeat_interleave(group, dim=1) if group > 1 else kk
            else:  # one query head: its key head
                kk = k[bs, hs.start // group : hs.start // group + 1].float()
            z = (q[bs, hs, qs].float() @ kk.transpose(-2, -1)) * factor
            if causal is not None:
                z = z.masked_fill(~causal[qs], -torch.inf)
            if mask is not None:
                m = mask[bs, hs, qs]
                z = z.masked_fill(~m, -torch.inf) if m.dtype == torch.bool else z + m.float()
            yield hs, z

    with _exact(q):
        return _reduce(blocks(), h, q.device)


def log_z_rows(logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Over a head's output positions: (sum of log Z, sum of the logits' mean over classes,
    how many positions, largest |log Z|), fp32 device scalars, a block of positions at a time;
    non-finite positions left out (the non-finite rules report them)."""
    flat = logits.detach().reshape(-1, logits.shape[-1]) if logits.dim() else logits.reshape(1, 1)
    rows = max(1, CHUNK_ELEMENTS // max(1, flat.shape[-1]))
    total = level = count = top = torch.zeros((), dtype=torch.float32, device=flat.device)
    with _exact(flat):
        for start in range(0, flat.shape[0], rows):
            z = flat[start : start + rows].float()
            log_z, mean = torch.logsumexp(z, dim=-1), z.mean(-1)
            ok = log_z.isfinite() & mean.isfinite()
            total = total + torch.where(ok, log_z, 0.0).sum()
            level = level + torch.where(ok, mean, 0.0).sum()
            count = count + ok.sum()
            top = torch.maximum(top, torch.where(ok, log_z.abs(), 0.0).amax())
    return total, level, count, top
