"""Attention statistics and log Z against brute force: ``F.scaled_dot_product_attention`` with
each of its options, ``nn.MultiheadAttention`` both ways, and Hugging Face's eager and SDPA
attention; the model's outputs and gradients untouched."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch.measure.attention import log_z_rows, sdpa_rows, softmax_rows

transformers = pytest.importorskip("transformers")


@pytest.fixture
def quiet_transformers():
    transformers.logging.set_verbosity_error()


def reference(logits: torch.Tensor) -> tuple[float, float, float]:
    """(largest logit of a query with a key left, mean query entropy, lowest head mean
    entropy) of ``(B, H, L, S)`` logits, the plain way."""
    z = logits.float()
    keyed = z.amax(-1) > -1e4  # (B, H, L): the query sees a key
    top = z.amax(-1)[keyed].max().item()
    p = z.softmax(-1)
    h = -(torch.special.xlogy(p, p)).sum(-1)  # (B, H, L)
    ok = keyed & h.isfinite()
    mean = h[ok].mean().item()
    heads = [h[:, i][ok[:, i]].mean().item() for i in range(h.shape[1]) if ok[:, i].any()]
    return top, mean, min(heads)


def measured(report, layer):
    s = report.layers[layer]
    return s.attention_max_logit, s.attention_entropy, s.attention_entropy_min


def one_step(model, run, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        with gradwatch.GradWatch(model, every_n_steps=1, **options) as gw:
            run(model).float().pow(2).mean().backward()
            return gw.step()


class Sdpa(nn.Module):
    def __init__(self, **call):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.call = call

    def forward(self, q, k, v):
        return self.proj(F.scaled_dot_product_attention(q, k, v, **self.call))


@pytest.mark.parametrize(
    "call",
    [
        {},
        {"is_causal": True},
        {"scale": 0.7},
        {"attn_mask": "bool"},
        {"attn_mask": "float"},
        {"enable_gqa": True},
    ],
    ids=["plain", "causal", "scale", "bool-mask", "float-mask", "gqa"],
)
def test_sdpa_statistics_are_the_softmax_it_computes(call):
    torch.manual_seed(0)
    q = torch.randn(3, 4, 6, 8, requires_grad=True) * 2
    k = torch.randn(3, 2 if call.get("enable_gqa") else 4, 6, 8) * 3
    v = torch.randn_like(k)
    call = dict(call)
    logits_k = k.repeat_interleave(4 // k.shape[1], dim=1)
    z = q.detach() @ logits_k.transpose(-1, -2) * call.get("scale", 8**-0.5)
    if call.get("is_causal"):
        z = z.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), -math.inf)
    if call.get("attn_mask") == "bool":
        mask = torch.rand(3, 1, 6, 6) > 0.4
        mask[..., 0] = True
        call["attn_mask"] = mask
        z = z.masked_fill(~mask, -math.inf)
    elif call.get("attn_mask") == "float":
        mask = torch.randn(6, 6) - 10 * (torch.rand(6, 6) > 0.7)
        call["attn_mask"] = mask
        z = z + mask
    report = one_step(Sdpa(**call), lambda m: m(q, k, v))
    got = measured(report, ":attention#0")
    for a, b in zip(got, reference(z)):
        assert a == pytest.approx(b, rel=1e-5)


def test_no_mask_convention_is_read_as_a_logit_and_queries_with_no_key_are_left_out():
    """Additive masks only lower logits (-inf, finfo.min, -1e4, Swin's -100); a query whose
    every key is masked (left padding under a causal mask) has a uniform softmax over masked
    keys: it is no query at all."""
    z = torch.randn(2, 3, 5, 5) * 3
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    for fill in (-100.0, -1e4, torch.finfo(torch.float32).min):
        masked = z.masked_fill(~causal, fill)
        top, entropies, queries = softmax_rows(masked)
        assert queries.tolist() == [10, 10, 10]  # per head: every query of both samples
        assert top.item() == pytest.approx(z.masked_fill(~causal, -math.inf).max().item())
        padded = masked.clone()
        padded[1, :, :2, :] = fill  # sample 1: its first two queries see only padding
        top, entropies, queries = softmax_rows(padded)
        if fill <= -1e4:
            assert queries.tolist() == [8, 8, 8]
        assert top.item() < 20


def test_autocast_does_not_round_the_statistics():
    """Under a user's bf16 (or fp16) autocast the reductions still run in fp32: fp16 would
    overflow q @ k above 65504, exactly the logits that matter."""
    q, k = torch.randn(2, 2, 6, 8) * 4, torch.randn(2, 2, 6, 8) * 4
    exact = [t.reshape(-1).double() for t in sdpa_rows(q, k)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = [t.reshape(-1).double() for t in sdpa_rows(q, k)]
    for a, b in zip(rounded, exact):
        assert a.tolist() == pytest.approx(b.tolist(), rel=1e-6)


@pytest.mark.parametrize("chunk", [2 * 4 * 7 * 7, 4 * 7, 7], ids=["samples", "rows", "one-row"])
def test_attention_is_reduced_a_bounded_block_at_a_time(monkeypatch, chunk):
    """Whole samples when they fit, else one head's block of query rows: the memory a logging
    step adds does not grow with the sequence; the numbers do not change."""
    import gradwatch.measure.attention as attention

    q, k = torch.randn(5, 4, 7, 4), torch.randn(5, 2, 7, 4)  # grouped-query: 2 key heads
    mask = torch.randn(5, 1, 7, 7)

    def flat(rows):
        return torch.cat([t.reshape(-1).double() for t in rows]).tolist()

    whole = flat(sdpa_rows(q, k, attn_mask=mask, is_causal=True))
    whole_softmax = flat(softmax_rows(q @ k.repeat_interleave(2, 1).transpose(-1, -2)))
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", chunk)
    assert flat(sdpa_rows(q, k, attn_mask=mask, is_causal=True)) == pytest.approx(whole, rel=1e-6)
    softmax = flat(softmax_rows(q @ k.repeat_interleave(2, 1).transpose(-1, -2)))
    assert softmax == pytest.approx(whole_softmax, rel=1e-6)


def test_three_dimensional_attention_is_one_head_per_sample():
    q, k = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    _, entropies, queries = sdpa_rows(q, k)
    assert queries.tolist() == [15.0]  # one head: 3 samples x 5 queries


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_statistics_both_ways(need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(3, 5, 8)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[1, 3:] = True
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)  # MHA: True is left out

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            out, _ = self.attn(
                x, x, x, key_padding_mask=padding, attn_mask=causal, need_weights=need_weights
            )
            return out

    report = one_step(Wrap(), lambda m: m(x))
    w, b = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
    q = (x @ w[:8].T + b[:8]).view(3, 5, 2, 4).transpose(1, 2)
    k = (x @ w[8:16].T + b[8:16]).view(3, 5, 2, 4).transpose(1, 2)
    z = (q @ k.transpose(-1, -2)) / 2.0
    z = z.masked_fill(causal, -math.inf).masked_fill(padding[:, None, None, :], -math.inf)
    for a, want in zip(measured(report, "attn:attention#0"), reference(z)):
        assert a == pytest.approx(want, rel=1e-5)


def _gpt2(impl):
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=32, attn_pdrop=0.0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation=impl,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_gpt2_attention_and_log_z_against_its_own_weights(quiet_transformers, impl):
    model = _gpt2(impl)
    ids = torch.randint(0, 97, (2, 12))
    attention = torch.ones(2, 12, dtype=torch.long)
    attention[1, 8:] = 0
    keep = {}
    hooks = [
        model.transformer.h[i].attn.c_attn.register_forward_hook(
            lambda m, a, out, i=i: keep.__setitem__(i, out.detach())
        )
        for i in range(2)
    ]
    report = one_step(model, lambda m: m(input_ids=ids, attention_mask=attention, labels=ids).loss)
    for h in hooks:
        h.remove()
    visible = torch.ones(12, 12, dtype=torch.bool).tril() & attention.bool()[:, None, None, :]
    for i in range(2):
        q, k, _ = keep[i].split(32, dim=-1)
        q, k = (t.view(2, 12, 4, 8).transpose(1, 2) for t in (q, k))
        z = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~visible, -math.inf)
        got = measured(report, f"transformer.h.{i}.attn:attention#0")
        for a, want in zip(got, reference(z)):
            assert a == pytest.approx(want, rel=1e-5)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits
    log_z = torch.logsumexp(logits, -1)
    head = report.layers["lm_head"]
    assert head.log_z_mean == pytest.approx(log_z.mean().item(), rel=1e-5)
    assert head.log_z_max == pytest.approx(log_z.abs().max().item(), rel=1e-5)
    assert head.logit_mean == pytest.approx(logits.mean().item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(
    "name",
    ["gpt2", "bert", "llama", "vit", "t5"],
)
def test_hf_attention_entropy_matches_output_attentions(quiet_transformers, name):
    """Every HF family named by the issue, eager: the entropy gradwatch measures is that of the
    attention probabilities the model itself returns."""
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (2, 10))
    if name == "gpt2":
        model, run = transformers.GPT2Model(_gpt2("eager").config), {"input_ids": ids}
    elif name == "bert":
        cfg = transformers.BertConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
            vocab_size=97, attn_implementation="eager", attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        model, run = transformers.BertModel(cfg), {"input_ids": ids}
    elif name == "llama":
        cfg = transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=97, attn_implementation="eager",
        )  # fmt: skip
        model, run = transformers.LlamaModel(cfg), {"input_ids": ids}
    elif name == "vit":
        cfg = transformers.ViTConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
            image_size=16, patch_size=4, attn_implementation="eager",
            attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        model, run = transformers.ViTModel(cfg), {"pixel_values": torch.randn(2, 3, 16, 16)}
    else:
        cfg = transformers.T5Config(
            num_layers=2, d_model=32, d_ff=64, num_heads=4, d_kv=8, vocab_size=97,
            decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0,
            attn_implementation="eager",
        )  # fmt: skip
        model, run = transformers.T5EncoderModel(cfg), {"input_ids": ids}
    model.train()
    with torch.no_grad():
        probs = model(**run, output_attentions=True).attentions
    report = one_step(model, lambda m: m(**run).last_hidden_state)
    rows = [s for s in report.layers.values() if s.attention_entropy is not None]
    assert len(rows) == len(probs) == 2
    for s, p in zip(rows, probs):
        h = -(torch.special.xlogy(p, p)).sum(-1)
        assert s.attention_entropy == pytest.approx(h.mean().item(), rel=1e-4)
        assert s.attention_entropy_min == pytest.approx(h.mean((0, 2)).min().item(), rel=1e-4)
        assert 0 < s.attention_max_logit < 50


def test_outputs_and_gradients_are_bit_identical_and_other_steps_stay_fused(quiet_transformers):
    model = _gpt2("sdpa")
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 97, (2, 12))
    seen = []

    class Count(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                seen.append(func)
            return func(*args, **(kwargs or {}))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        gw = gradwatch.GradWatch(model, every_n_steps=2)
        for step in range(2):
            watched = model(input_ids=ids, labels=ids)
            plain = twin(input_ids=ids, labels=ids)
            assert torch.equal(watched.logits, plain.logits)
            watched.loss.backward()
            plain.loss.backward()
            for a, b in zip(model.parameters(), twin.parameters()):
                assert torch.equal(a.grad, b.grad)
            report = gw.step()
            assert (report is not None) == (step == 0)
            model.zero_grad()
            twin.zero_grad()
        with Count():  # step 1 is not a logging step: the model calls SDPA itself, once a layer
            model(input_ids=ids)
        gw.close()
    assert len(seen) == 2


def test_log_z_head_found_or_declared_and_checked():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 8)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(self.body(x))

    x = torch.randn(6, 4)
    found = one_step(Net(), lambda m: m(x))
    assert found.layers["fc"].log_z_mean is not None
    assert found.layers["body"].log_z_mean is None
    declared = one_step(Net(), lambda m: m(x), logits_layer="body")
    assert declared.layers["body"].log_z_mean is not None
    assert declared.layers["fc"].log_z_mean is None
    off = one_step(Net(), lambda m: m(x), logits_layer=None)
    assert all(s.log_z_mean is None for s in off.layers.values())
    with pytest.raises(ValueError, match="logits_layer must be a module name.*'nope'"):
        gradwatch.GradWatch(Net(), logits_layer="nope")
    with pytest.raises(TypeError, match="logits_layer"):
        gradwatch.GradWatch(Net(), logits_layer=3)
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5))  # no head by name
    assert all(s.log_z_mean is None for s in one_step(plain, lambda m: m(x)).layers.values())


def test_log_z_is_reduced_a_block_of_positions_at_a_time(monkeypatch):
    import gradwatch.measure.attention as attention

    logits = torch.randn(4, 9, 11) * 5
    whole = [t.item() for t in log_z_rows(logits)]
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", 11 * 2)  # two positions a block
    assert [t.item() for t in log_z_rows(logits)] == pytest.approx(whole, rel=1e-6)
    z = torch.logsumexp(logits, -1)
    assert whole == pytest.approx(
        [z.sum().item(), logits.mean(-1).sum().item(), 36, z.abs().max().item()], rel=1e-5
    )


def test_left_padding_under_hf_eager_attention_is_not_a_logit(quiet_transformers):
    """Hugging Face's eager attention adds finfo.min for masked keys: a padded query under a
    causal mask sees only masked keys, a uniform softmax over logits of -3.4e38. Those queries
    are left out; nothing else changes."""
    cfg = transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=97, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(1, 97, (2, 10))
    attention = torch.ones(2, 10, dtype=torch.long)
    attention[1, :4] = 0  # left padding
    report = one_step(model, lambda m: m(input_ids=ids, attention_mask=attention).logits)
    row = report.layers["model.layers.0.self_attn:attention#0"]
    assert 0 < row.attention_max_logit < 10
    assert not report.findings
    with torch.no_grad():
        probs = model(input_ids=ids, attention_mask=attention, output_attentions=True).attentions
    h = -(torch.special.xlogy(probs[0], probs[0])).sum(-1)  # (2, 4, 10)
    seen = torch.ones(2, 4, 10, dtype=torch.bool)
    seen[1, :, :4] = False  # the padded queries, which see no key
    assert row.attention_entropy == pytest.approx(h[seen].mean().item(), rel=1e-4)


def test_tensorboard_gets_attention_log_z_shares_adam_health_and_the_loss(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.helpers.lm import train_lm

    train_lm(21, 1e-3, every=10, log_dir=str(tmp_path))
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "gradwatch_t1_attention_max_logit/blocks.0:attention#0",
        "gradwatch_t2_attention_entropy/blocks.1:attention#0",
        "gradwatch_t3_log_z/lm_head",
        "gradwatch_t4_grad_share/lm_head",
        "gradwatch_t5_update_ratio/blocks.0.qkv",
        "gradwatch_t6_adam_step_rms/blocks.0.qkv",
        "gradwatch_t7_adam_epsilon_share/blocks.0.qkv",
        "gradwatch/global/loss",
    ):
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("gradwatch/global/loss")] == [0, 10, 20]
    shares = [acc.Scalars(t)[-1].value for t in tags if t.startswith("gradwatch_t4_grad_share/")]
    assert sum(shares) == pytest.approx(1.0, rel=1e-4)  # no parameter shared between layers
