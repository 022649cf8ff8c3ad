"""Healthy transformers trained with their usual recipes stay silent: Hugging Face GPT-2, BERT,
Llama, ViT and T5 at CPU size, hundreds of steps each, AdamW with warm-up, the loss given, every
statistic of the transformer rules measured (weights read on every logging step)."""

import math
import warnings

import pytest
import torch

import gradwatch
from tests.helpers.lm import corpus, watched_run

transformers = pytest.importorskip("transformers")
STEPS = 200


def _text(batch=8, context=32, seed=0):
    data, vocab = corpus()
    g = torch.Generator().manual_seed(seed)

    def sample():
        start = torch.randint(0, len(data) - context - 1, (batch,), generator=g)
        return torch.stack([data[s : s + context] for s in start])

    return sample, vocab


def _gpt2():
    sample, vocab = _text()
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=vocab, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)

    def loss(step):
        ids = sample()
        return model(input_ids=ids, labels=ids).loss

    return model, loss, 6e-4, (0.9, 0.95), 0.1


def _llama():
    sample, vocab = _text()
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=vocab, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)

    def loss(step):
        ids = sample()
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    return model, loss, 3e-4, (0.9, 0.95), 0.1


def _bert():
    sample, vocab = _text()
    cfg = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
        vocab_size=vocab + 1, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.BertForMaskedLM(cfg)
    g = torch.Generator().manual_seed(1)

    def loss(step):
        ids = sample()
        masked = torch.rand(ids.shape, generator=g) < 0.15
        labels = torch.where(masked, ids, -100)
        return model(input_ids=ids.masked_fill(masked, vocab), labels=labels).loss

    return model, loss, 5e-4, (0.9, 0.999), 0.01


def _vit():
    cfg = transformers.ViTConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
        image_size=16, patch_size=4, num_labels=4,
    )  # fmt: skip
    model = transformers.ViTForImageClassification(cfg)
    g = torch.Generator().manual_seed(2)

    def loss(step):  # the label is the brightest quadrant
        x = torch.randn(16, 3, 16, 16, generator=g)
        quadrants = x.mean(1).unfold(1, 8, 8).unfold(2, 8, 8).mean((-1, -2)).flatten(1)
        return model(pixel_values=x, labels=quadrants.argmax(1)).loss

    return model, loss, 1e-3, (0.9, 0.999), 0.05


def _t5():
    sample, vocab = _text(context=16)
    cfg = transformers.T5Config(
        num_layers=2, num_decoder_layers=2, d_model=64, d_ff=128, num_heads=4, d_kv=16,
        vocab_size=vocab + 1, decoder_start_token_id=vocab, pad_token_id=vocab,
    )  # fmt: skip
    model = transformers.T5ForConditionalGeneration(cfg)

    def loss(step):  # reverse the text
        ids = sample()
        return model(input_ids=ids, labels=ids.flip(1)).loss

    return model, loss, 1e-3, (0.9, 0.999), 0.0


@pytest.mark.parametrize("make", [_gpt2, _llama, _bert, _vit, _t5], ids=lambda f: f.__name__[1:])
def test_a_healthy_transformer_trained_as_usual_is_silent(make):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model, loss_of, lr, betas, decay = make()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=decay)
    warmup = 20
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / STEPS))
    )
    reports, losses = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", gradwatch.GradWatchWarning)
        with gradwatch.GradWatch(model, every_n_steps=10, weight_norm_every=1) as gw:
            for step in range(STEPS):
                loss = loss_of(step)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                report = gw.step(opt, loss=loss)
                opt.step()
                schedule.step()
                losses.append(loss.item())
                if report is not None:
                    reports.append(report)
    ours = [w for w in caught if issubclass(w.category, gradwatch.GradWatchWarning)]
    assert not ours, [str(w.message) for w in ours]
    assert not [f.message for r in reports for f in r.findings]
    assert sum(losses[-20:]) < sum(losses[:20])  # it trained
    last = reports[-1]
    assert any(s.attention_max_logit is not None for s in last.layers.values())
    assert any(s.adam_step_rms is not None for s in last.layers.values())
    assert last.loss == pytest.approx(losses[last.step])


def test_gpt2_conv1d_layers_have_an_update_gain():
    """Hugging Face's Conv1D (GPT-2's attention and MLP projections) is a Linear stored
    transposed: its update and weight gain are measured like a Linear's."""
    transformers.logging.set_verbosity_error()
    model, loss_of, lr, betas, decay = _gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    with gradwatch.GradWatch(model, every_n_steps=1, warn=False) as gw:
        loss_of(0).backward()
        report = gw.step(opt)
    conv = report.layers["transformer.h.0.attn.c_attn"]
    weight = model.transformer.h[0].attn.c_attn.weight
    assert conv.module_type == "Conv1D"
    want = weight.detach().pow(2).mean().sqrt().item() * math.sqrt(weight.shape[0])
    assert conv.weight_gain == pytest.approx(want, rel=1e-5)
    assert conv.update_gain is not None and conv.update_gain > 0
    assert conv.update_ratio > 0


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_the_same_models_at_a_rate_fifty_times_too_high_grow_their_attention_logits(make):
    """Model code nobody here wrote, no qk-layernorm, AdamW (beta2 0.95) at 3e-2: the logits
    grow from about 0.1 past a thousand within 300 steps (measured: GPT-2 2,463, Llama 1,935),
    and the finding says so with qk-layernorm first."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(1)
    model, loss_of, _, _, _ = make()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, betas=(0.9, 0.95), weight_decay=0.0)
    reports, _ = watched_run(model, opt, loss_of, 300, every_n_steps=25)
    logits = [
        max(s.attention_max_logit for s in r.layers.values() if s.attention_max_logit)
        for r in reports
    ]
    assert logits[0] < 1 and max(logits) > 1000
    found = [f for r in reports for f in r.findings if f.kind == "attention_logits"]
    assert found and found[0].since <= 100 and found[0].remedies[0].id == "qk-layernorm"
    assert any(f.severity == "error" for f in found)
