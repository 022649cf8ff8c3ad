"""Held-out architectures, never used to tune a threshold: healthy ones must raise no alarm,
broken ones must be caught with the remedy that fits their cause."""

import pytest
import torch
import torch.nn.functional as F

from .conftest import ce, diagnose_model
from .helpers import zoo

IMAGES = (torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,)))
TOKENS = torch.randint(0, 100, (8, 32))


def token_loss(m):
    return F.cross_entropy(m(TOKENS).flatten(0, 1), TOKENS.flatten())


HEALTHY = {
    "cnn with batch norm and pooling": (zoo.cnn_bn_pool, ce(*IMAGES)),
    "resnet with functional relu": (zoo.SmallResNet, ce(*IMAGES)),
    "post-norm TransformerEncoder": (zoo.TokenTransformer, token_loss),
    "pre-norm gelu TransformerEncoder": (
        lambda: zoo.TokenTransformer(norm_first=True, activation="gelu"),
        token_loss,
    ),
    "two-layer LSTM": (zoo.LSTMClassifier, ce(torch.randn(8, 50, 32), torch.randint(0, 5, (8,)))),
    "functional tanh with batch norm": (
        zoo.FunctionalTanhBN,
        ce(torch.randn(64, 64), torch.randint(0, 3, (64,))),
    ),
}


@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_healthy_architectures_raise_no_alarm(name):
    make, loss = HEALTHY[name]
    r = diagnose_model(make(), loss, steps=3, lr=1e-2)
    assert r.findings == [], [f.message for f in r.findings]
    measured = [s for s in r.layers.values() if s.signal is not None]
    assert len(measured) >= len(r.layers) // 2  # the measurements are there, not silently absent


def test_nn_transformer_encoder_decoder_is_healthy():
    model = torch.nn.Transformer(
        d_model=64,
        nhead=4,
        num_encoder_layers=4,
        num_decoder_layers=4,
        dim_feedforward=128,
        dropout=0.0,
        batch_first=True,
    )
    src, tgt = torch.randn(4, 12, 64), torch.randn(4, 9, 64)
    r = diagnose_model(model, lambda m: m(src, tgt).pow(2).mean(), steps=2, lr=1e-3)
    assert r.findings == []
    assert any(n.endswith(":relu#0") for n in r.layers)  # the layers' F.relu calls are watched


def test_functional_sigmoid_net_vanishes_with_relu_family_remedy():
    r = diagnose_model(
        zoo.FunctionalSigmoidNet(), ce(torch.randn(64, 128), torch.randint(0, 4, (64,)))
    )
    assert {f.kind for f in r.findings} == {"vanishing"}
    assert "hidden.0" in {f.layer for f in r.findings}
    assert r.findings[0].remedies[0].id == "relu-family"
    assert ":sigmoid#15" in r.layers


def test_plain_relu_cnn_with_default_init_vanishes_with_he_init_remedy():
    r = diagnose_model(zoo.deep_relu_cnn_default(), ce(*IMAGES))
    vanishing = [f for f in r.findings if f.kind == "vanishing"]
    assert vanishing and vanishing[0].layer == "0"
    assert vanishing[0].remedies[0].id == "he-init"


transformers = pytest.importorskip("transformers", reason="Hugging Face transformers not installed")


@pytest.fixture(scope="module")
def quiet_transformers():
    transformers.logging.set_verbosity_error()


def test_hf_bert_random_init_is_healthy(quiet_transformers):
    cfg = transformers.BertConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=500,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(cfg)
    ids, labels = torch.randint(0, 500, (8, 16)), torch.randint(0, 3, (8,))
    r = diagnose_model(model, lambda m: m(input_ids=ids, labels=labels).loss, steps=2, lr=1e-3)
    assert r.findings == []
    gelu = [s for s in r.layers.values() if s.activation == "gelu"]
    assert len(gelu) == 4 and all(s.saturation is not None for s in gelu)


def test_hf_gpt2_random_init_is_healthy(quiet_transformers):
    cfg = transformers.GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=500, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 500, (8, 16))
    r = diagnose_model(model, lambda m: m(input_ids=ids, labels=ids).loss, steps=2, lr=1e-3)
    assert r.findings == []
    assert sum(1 for s in r.layers.values() if s.activation == "gelu") == 4


def _compiled_like_eager(model, call, caplog):
    """Four watched steps of ``model`` eager (a copy) and compiled (``aot_eager``), through
    ``call(run)`` -> loss; asserts the compiled report equals the eager one and that dynamo hit no
    recompile limit. Returns the eager report and dynamo's (graphs, graph breaks)."""
    import copy
    import logging

    from torch._dynamo.utils import counters

    from gradwatch import GradWatch

    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    reports = {}
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        for key, m, run in (("eager", twin, twin), ("compiled", model, compiled)):
            with GradWatch(m, every_n_steps=1, warn=False) as gw:
                for _ in range(4):
                    call(run).backward()
                    reports[key] = gw.step()
                    m.zero_grad()
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    torch._dynamo.reset()
    eager, got = reports["eager"], reports["compiled"]
    assert list(got.layers) == list(eager.layers)
    for name, s in eager.layers.items():
        for field in (
            "grad_norm", "signal", "saturation", "dead_units", "calls", "attention_max_logit",
            "attention_entropy", "attention_entropy_min", "log_z_mean", "logit_mean",
        ):  # fmt: skip
            a, b = getattr(s, field), getattr(got.layers[name], field)
            assert (a is None) == (b is None), (name, field)
            if a is not None:
                assert b == pytest.approx(a, rel=1e-4, abs=1e-7), (name, field)
    limits = [r.getMessage() for r in caplog.records if "recompile_limit" in r.getMessage()]
    assert not limits, limits[0]
    return eager, (graphs, breaks)


def test_hf_gpt2_compiled_measures_like_eager_without_recompiling_hooks(quiet_transformers, caplog):
    # GPT-2's loss path breaks dynamo's graph (a logger call) and dynamo runs part of the model
    # eagerly; it used to compile gradwatch's hooks there as frames of their own, recompiling
    # them until its limit (two warnings on this model).
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=500, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    ids = torch.randint(0, 500, (4, 16))
    eager, _ = _compiled_like_eager(
        transformers.GPT2LMHeadModel(cfg), lambda run: run(input_ids=ids, labels=ids).loss, caplog
    )
    assert sum(1 for s in eager.layers.values() if s.activation == "gelu") == 2
    # attention and log Z are traced into the graph too (compared above, field by field)
    assert eager.layers["lm_head"].log_z_mean is not None
    assert eager.layers["transformer.h.1.attn:attention#0"].attention_entropy is not None


def test_hf_llama_compiled_for_training_keeps_one_graph_and_measures_like_eager(
    quiet_transformers, caplog
):
    # Trained without a KV cache (use_cache=False), a compiled Llama is one graph with gradwatch
    # attached, as without it. (With the cache, dynamo in torch 2.13 loses the cache layers'
    # attribute stores once the signal hooks are traced, and falls back layer by layer: see the
    # known limits in docs/limits.md.)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=500, max_position_embeddings=64,
    )  # fmt: skip
    ids = torch.randint(0, 500, (4, 16))
    eager, (graphs, breaks) = _compiled_like_eager(
        transformers.LlamaForCausalLM(cfg),
        lambda run: run(input_ids=ids, labels=ids, use_cache=False).loss,
        caplog,
    )
    assert breaks == 0
    assert graphs <= 2  # the first logging step, and the next ones (functional callers known)
    assert sum(1 for s in eager.layers.values() if s.signal is not None) > 10


def test_hf_mobilevit_random_init_compares_each_stage_alone(quiet_transformers):
    """MobileViT repeats its transformer layers over three stages of different widths and
    resolutions: one chain across them read as 2.9e4x growth toward the input."""
    torch.manual_seed(0)
    model = transformers.MobileViTForImageClassification(
        transformers.MobileViTConfig(num_labels=10)
    )
    x, y = torch.randn(2, 3, 256, 256), torch.randint(0, 10, (2,))
    r = diagnose_model(model, lambda m: m(pixel_values=x, labels=y).loss, steps=1, lr=1e-3)
    assert r.findings == [], [f.message for f in r.findings]
    sizes = {
        s.output_elements
        for n, s in r.layers.items()
        if n.endswith("attention.output.dense") and s.output_elements
    }
    assert len(sizes) == 3  # one size per stage


@pytest.mark.parametrize("seed", range(5))
def test_squeeze_excitation_relus_are_not_called_dead_by_chance_signs(seed):
    """An SE block's ReLU sees one pooled vector per sample: at initialisation about as many units
    are off for every sample as are on for every sample, which says nothing about death."""
    torch.manual_seed(seed)
    model = zoo.se_cnn()
    x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,))
    r = diagnose_model(model, ce(x, y), steps=3, lr=1e-2)
    assert r.findings == [], [f.message for f in r.findings]
    se = [s for n, s in r.layers.items() if n.endswith("activation") and s.activation == "relu"]
    assert len(se) == 4 and all(s.units >= 8 for s in se)
