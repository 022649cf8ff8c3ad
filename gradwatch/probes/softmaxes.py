"""Where a model's softmaxes are: the attention calls the functional mode sees, and the output
head whose log Z is watched. The maths is :mod:`gradwatch.measure.attention`'s."""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..measure.attention import log_z_rows, sdpa_rows, softmax_rows
from ..measure.statistics import ATTENTION, ATTENTION_PEAK, LOG_Z, LOG_Z_PEAK, STATISTICS

if TYPE_CHECKING:
    from .buffers import Entry
    from .recorder import Recorder

SDPA, SOFTMAX, MHA = "sdpa", "softmax", "mha"
# Calls the functional mode treats as attention. A softmax counts only inside an attention
# module (below): elsewhere it is a router's or a classifier's. The mode cannot see inside
# ``multi_head_attention_forward`` (it is off while a call it caught runs), so that call's
# queries and keys are projected again from its own arguments.
ATTENTION_FUNCTIONS: dict[Any, str] = {
    F.scaled_dot_product_attention: SDPA,
    F.softmax: SOFTMAX,
    torch.softmax: SOFTMAX,
    torch.Tensor.softmax: SOFTMAX,
    F.multi_head_attention_forward: MHA,
}
# Output heads found by name when the model does not say (``get_output_embeddings``).
HEAD_NAMES = ("lm_head", "classifier", "score", "head", "fc", "output")


def is_attention(name: str, module: nn.Module) -> bool:
    """An attention module, by its class or attribute name (``nn.MultiheadAttention``, Hugging
    Face's ``GPT2Attention``/``BertSelfAttention``/``LlamaAttention``, timm's ``Attention``,
    ``self.attn``)."""
    last = name.rsplit(".", 1)[-1].lower()
    cls = type(module).__name__.lower()
    return "attention" in cls or "attn" in cls or "attention" in last or "attn" in last


def heads_of(module: nn.Module) -> int | None:
    """The number of heads a module says it has, for a softmax over ``(B*H, L, S)``."""
    for attr in ("num_heads", "n_head", "num_attention_heads", "n_heads"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _arg(args: tuple, kwargs: dict, position: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else default


def attention_rows(how: str, args: tuple, kwargs: dict, heads: int | None) -> tuple | None:
    """(largest logit, per head: entropy sum, queries) of one attention call, or None when the
    call is not attention (a softmax over another dim, or of a vector)."""
    if how == SDPA:
        query, key = _arg(args, kwargs, 0, "query"), _arg(args, kwargs, 1, "key")
        return sdpa_rows(
            query,
            key,
            attn_mask=_arg(args, kwargs, 3, "attn_mask"),
            is_causal=bool(_arg(args, kwargs, 5, "is_causal", False)),
            scale=_arg(args, kwargs, 6, "scale"),
        )
    if how == MHA:
        return _mha_rows(_mha_signature().bind(*args, **kwargs))
    x = _arg(args, kwargs, 0, "input")
    dim = _arg(args, kwargs, 1, "dim")
    if not isinstance(x, torch.Tensor) or x.dim() < 3 or not isinstance(dim, int):
        return None
    if dim % x.dim() != x.dim() - 1 or not x.is_floating_point():
        return None
    return softmax_rows(x, heads)


@functools.cache
def _mha_signature() -> inspect.Signature:
    """``F.multi_head_attention_forward``'s signature, read once (not at import)."""
    return inspect.signature(F.multi_head_attention_forward)


def _mha_rows(call: inspect.BoundArguments) -> tuple | None:
    """``F.multi_head_attention_forward``'s logits from its arguments: the query and key
    projections again, its boolean masks (True: left out) and float masks (added). Calls with
    ``bias_k``, ``add_zero_attn`` or static keys are not measured."""
    a = {**call.arguments}
    get = lambda name: a.get(name)  # noqa: E731
    if get("bias_k") is not None or get("add_zero_attn") or get("static_k") is not None:
        return None
    query, key, heads = get("query"), get("key"), int(get("num_heads"))
    if query.dim() == 2:  # unbatched: (L, E)
        query, key = query.unsqueeze(1), key.unsqueeze(1)
    embed = query.shape[-1]
    bias = get("in_proj_bias")
    if get("use_separate_proj_weight"):
        w_q, w_k = get("q_proj_weight"), get("k_proj_weight")
    else:
        w_q, w_k = get("in_proj_weight")[:embed], get("in_proj_weight")[embed : 2 * embed]
    b_q, b_k = (bias[:embed], bias[embed : 2 * embed]) if bias is not None else (None, None)
    q = F.linear(query.detach(), w_q.detach(), None if b_q is None else b_q.detach())
    k = F.linear(key.detach(), w_k.detach(), None if b_k is None else b_k.detach())
    length, batch, source = q.shape[0], q.shape[1], k.shape[0]
    q = q.reshape(length, batch, heads, -1).permute(1, 2, 0, 3)
    k = k.reshape(source, batch, heads, -1).permute(1, 2, 0, 3)
    mask = None
    for m, shape in (
        (get("attn_mask"), (batch, heads, length, source)),
        (get("key_padding_mask"), (batch, 1, 1, source)),
    ):
        if m is None:
            continue
        m = m.detach()
        m = (
            torch.zeros(m.shape, device=q.device).masked_fill(m, -torch.inf)
            if m.dtype == torch.bool
            else m.float()
        )
        m = m.reshape(shape) if m.dim() == 3 or shape[1] == 1 else m
        mask = m if mask is None else mask + m
    return sdpa_rows(q, k, attn_mask=mask)


def output_head(model: nn.Module, name: str | None) -> str | None:
    """The name of the module whose outputs are the model's logits: ``name`` when given (checked
    by the caller; None: no head); for ``"auto"`` the module ``get_output_embeddings()`` returns
    (Hugging Face), else the last module with a weight whose attribute name is a usual head's
    (``lm_head``, ``classifier``, ``fc``...) and whose outputs are at least 2 wide. None: none."""
    if name != "auto":
        return name
    modules = dict(model.named_modules())
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            found = get()
        except Exception:  # a model whose method needs more than itself
            found = None
        if isinstance(found, nn.Module):
            for n, m in modules.items():
                if m is found:
                    return n
    for n, m in reversed(list(modules.items())):
        w = getattr(m, "weight", None)
        last = n.rsplit(".", 1)[-1]
        if last in HEAD_NAMES and isinstance(m, nn.Linear) and m.out_features >= 2:
            return n
        if isinstance(w, torch.Tensor) and w.dim() >= 2 and n.count(".") == 0:
            return None  # the last top-level weight is something else: no head
    return None


def attention_measured(caller: Any, how: str, args: tuple, kwargs: dict) -> dict | None:
    """Statistic name -> the row one attention call adds, or None when the call is not
    attention (a softmax outside an attention module, or over another dim). Traced code calls
    it too."""
    if caller.fn_skip or (how == SOFTMAX and not caller.attention):
        return None
    rows = attention_rows(how, args, kwargs, caller.heads)
    if rows is None:
        return None
    top, entropy_sums, queries = rows
    return {
        ATTENTION.name: ATTENTION.pack(entropy_sum=entropy_sums, queries=queries),
        ATTENTION_PEAK.name: ATTENTION_PEAK.pack(max_logit=top),
    }


def record_attention(
    probes: Recorder, how: str, args: tuple, kwargs: dict, heads: tuple[int, int] | None = None
) -> None:
    """One attention call, into the entry ``<caller>:attention#<k>`` of the module running it;
    ``heads``: (block, blocks) when its heads are this rank's block of a tensor-parallel split."""
    caller = probes.caller(probes.stack)
    rows = attention_measured(caller, how, args, kwargs)
    if rows is None:
        return
    name = probes.fn_name(caller, "attention", probes.fn_index(caller, "attention"))
    entry = probes.entries.get(name) or probes.fn_entry(name, "attention", None, {})
    entry.calls += 1
    entry.head_block = heads
    for statistic in (ATTENTION, ATTENTION_PEAK):
        entry.add(statistic, rows[statistic.name])


def record_log_z(entry: Entry, logits: torch.Tensor) -> None:
    """An output head's logits: their log Z per position, into its entry."""
    for statistic, row in log_z_measured(logits).items():
        entry.add(STATISTICS[statistic], row)


def log_z_measured(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistic name -> the row an output head's logits add (traced code calls it too)."""
    total, level, count, top = log_z_rows(logits)
    return {
        LOG_Z.name: LOG_Z.pack(sum=total, level=level, count=count),
        LOG_Z_PEAK.name: LOG_Z_PEAK.pack(absmax=top),
    }
