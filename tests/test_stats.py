"""Every statistic of gradwatch.measure.stats against a brute-force reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from gradwatch.measure import stats

FUNCTIONS = {
    "sigmoid": (torch.sigmoid, {}),
    "tanh": (torch.tanh, {}),
    "softsign": (F.softsign, {}),
    "hardtanh": (lambda x: F.hardtanh(x, -0.5, 2.0), {"min_val": -0.5, "max_val": 2.0}),
    "hardsigmoid": (F.hardsigmoid, {}),
    "relu": (F.relu, {}),
    "relu6": (F.relu6, {}),
    "leaky_relu": (lambda x: F.leaky_relu(x, 0.001), {"negative_slope": 0.001}),
    "elu": (lambda x: F.elu(x, 1.5), {"alpha": 1.5}),
    "celu": (lambda x: F.celu(x, 0.7), {"alpha": 0.7}),
    "selu": (F.selu, {}),
    "softplus": (lambda x: F.softplus(x, beta=2.0), {"beta": 2.0}),
    "gelu": (F.gelu, {}),
    "silu": (F.silu, {}),
}


def derivative(fn, x):
    """The local derivative of an element-wise function, by autograd."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return g


@pytest.mark.parametrize("kind", sorted(FUNCTIONS))
def test_flat_mask_matches_autograd_derivative(kind):
    fn, params = FUNCTIONS[kind]
    x = torch.linspace(-12, 12, 20001, dtype=torch.float64)
    d = derivative(fn, x).abs()
    peak = d.max()
    eps = 1e-2
    mask = stats.flat_mask(kind, fn(x), x, eps, **params)
    expected = d < eps * peak
    # The analytic peak constants are rounded and kinks sit exactly on a grid point: allow the
    # boundary points only.
    assert (mask != expected).sum() <= 4, (kind, (mask != expected).sum())
    assert expected.any() or kind == "leaky_relu" and not mask.any()


@pytest.mark.parametrize("kind", sorted(FUNCTIONS))
def test_nan_is_not_flat(kind):
    fn, params = FUNCTIONS[kind]
    x = torch.tensor([float("nan"), -30.0, 0.0, 30.0])
    mask = stats.flat_mask(kind, fn(x), x, 1e-2, **params)
    assert not mask[0], kind  # a NaN layer is reported as non-finite, not as dead or saturated


def test_flat_mask_needs_input_for_gelu_and_silu():
    y = F.gelu(torch.randn(10))
    assert stats.flat_mask("gelu", y, None) is None
    assert stats.flat_mask("silu", y, None) is None
    assert stats.flat_mask("relu", y, None) is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gelu_and_silu_flat_masks_stay_exact_in_half_precision(dtype):
    # The reference: the closed forms in float64, on the very values the layer saw.
    x = (torch.randn(200_000, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    z = x.double()
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    exact = {
        "gelu": cdf + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi),
        "silu": torch.sigmoid(z) * (1 + z * (1 - torch.sigmoid(z))),
    }
    for kind, peak in (("gelu", 1.129), ("silu", 1.100)):
        expected = exact[kind].abs() < 1e-2 * peak
        mask = stats.flat_mask(kind, F.gelu(x) if kind == "gelu" else F.silu(x), x, 1e-2)
        # Only values within rounding of the threshold may differ (the formula written out in
        # bf16 misjudged about 200 of these 200,000).
        assert (mask != expected).sum() <= 10, (kind, (mask != expected).sum())


def test_flat_mask_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        stats.flat_mask("swishy", torch.zeros(3))


def test_leaky_relu_with_usual_slope_is_never_flat():
    y = F.leaky_relu(torch.randn(1000), 0.01)
    assert not stats.flat_mask("leaky_relu", y, negative_slope=0.01).any()


def test_flat_counts_per_unit_on_last_dim_and_channels():
    flat = torch.ones(4, 5, 3, dtype=torch.bool)
    flat[2, 1, 0] = False  # unit 0 on the last axis, unit 1 on axis 1
    assert stats.flat_counts(flat, 2).tolist() == [19, 20, 20]
    assert stats.flat_counts(flat, 1).tolist() == [12, 11, 12, 12, 12]
    # brute force over random masks, every axis of a 4-d tensor, and 0-d / 1-d tensors
    g = torch.Generator().manual_seed(0)
    flat = torch.rand(6, 4, 7, 5, generator=g) > 0.3
    for axis in range(4):
        ref = [int(flat.select(axis, u).sum()) for u in range(flat.shape[axis])]
        assert stats.flat_counts(flat, axis).tolist() == ref
    assert stats.flat_counts(torch.tensor([True, False, True]), 0).tolist() == [1, 0, 1]
    assert stats.flat_counts(torch.tensor(True), 0).tolist() == [1]


def test_flat_counts_are_exact_for_half_masks_in_any_layout():
    # bf16 holds integers exactly only up to 256: every partial sum must be fp32
    flat = torch.ones(3, 2, 40, 40, dtype=torch.bfloat16)
    flat[0, 1, 0, 0] = 0
    expected = [4800.0, 4799.0]
    assert stats.flat_counts(flat, 1).tolist() == expected
    assert stats.flat_counts(flat.to(memory_format=torch.channels_last), 1).tolist() == expected
    out = torch.empty(2)
    assert stats.flat_counts(flat, 1, out=out) is out
    assert out.tolist() == expected


def test_segment_totals_against_a_loop():
    g = torch.Generator().manual_seed(1)
    rows = torch.tensor([3] * 4 + [5] * 2 + [2] * 6)
    owner = torch.tensor([0] * 4 + [2] * 2 + [0] * 6)  # entry 0 has two segments, 1 has none
    counts = (torch.rand(12, generator=g) * (rows + 1)).long().clamp(max=rows)
    counts[0], counts[5] = 3, 5  # at least one dead unit in each segment
    out = stats.segment_totals(counts, rows, owner, 3)
    flat = [sum(int(c) for c, o in zip(counts, owner) if o == k) for k in range(3)]
    dead = [sum(int(c == r) for c, r, o in zip(counts, rows, owner) if o == k) for k in range(3)]
    active = [sum(int(c == 0) for c, o in zip(counts, owner) if o == k) for k in range(3)]
    assert [v.tolist() for v in out] == [[float(v) for v in row] for row in (flat, dead, active)]
    assert dead[0] >= 1 and dead[1] == 0 and dead[2] >= 1


def test_unit_axis():
    assert stats.unit_axis(2, channels_first=True) == 1
    assert stats.unit_axis(2, channels_first=False) == 1
    assert stats.unit_axis(4, channels_first=True) == 1
    assert stats.unit_axis(3, channels_first=False) == 2


def test_norm_is_exact_and_overflow_safe_for_half():
    t = torch.full((100,), 300.0, dtype=torch.float16)  # t.pow(2).sum() in fp16 is inf
    assert torch.isinf(t.pow(2).sum())
    assert stats.norm(t).item() == pytest.approx(3000.0)
    r = torch.randn(37, 11)
    assert stats.norm(r).item() ** 2 == pytest.approx((r.double() ** 2).sum().item(), rel=1e-5)
    d = torch.randn(37, 11, dtype=torch.float64)  # reduced in float64, not refused
    assert stats.norm(d, out=torch.empty(())).item() == pytest.approx(d.norm().item(), rel=1e-6)


def test_signal_sumsq_matches_a_loop_and_keeps_a_vanishing_gradient():
    g = torch.randn(6, 5)
    sumsq = stats.signal_sumsq(g).item()
    assert sumsq == pytest.approx(sum(v * v for v in g.double().reshape(-1).tolist()), rel=1e-6)
    tiny = torch.full((4,), 1e-20)  # squared in fp32 it would be 0: the signal would vanish
    assert stats.signal_sumsq(tiny).item() == pytest.approx(4e-40, rel=1e-5)
    half = torch.full((100,), 300.0, dtype=torch.float16)  # its squares overflow fp16
    assert stats.signal_sumsq(half, torch.float32).item() == pytest.approx(9e6)


def test_norm_min_max_and_their_combination_match_the_concatenation():
    a = torch.tensor([[-3.0, 1.0], [2.0, 0.5]])
    b = torch.randn(7, 5) * 4
    rows = torch.stack([stats.norm_min_max(a), stats.norm_min_max(b)])
    assert rows[0].tolist() == pytest.approx([math.sqrt(9 + 1 + 4 + 0.25), -3.0, 2.0])
    both = torch.cat([a.reshape(-1), b.reshape(-1)]).double()
    sumsq, absmax = (v.item() for v in stats.sumsq_absmax(rows))
    assert sumsq == pytest.approx((both**2).sum().item(), rel=1e-5)
    assert absmax == both.abs().max().item()
    half = torch.full((100,), 300.0, dtype=torch.float16)  # squared in fp16 it would be inf
    assert stats.norm_min_max(half).tolist() == pytest.approx([3000.0, 300.0, 300.0])


def test_norm_min_max_propagates_nan_and_inf():
    nan = stats.norm_min_max(torch.tensor([1.0, float("nan"), -2.0]))
    assert torch.isnan(nan).all()
    rows = torch.stack([stats.norm_min_max(torch.ones(3)), nan])
    assert math.isnan(stats.sumsq_absmax(rows)[1].item())
    inf = stats.norm_min_max(torch.tensor([1.0, -float("inf")]))
    assert stats.sumsq_absmax(inf[None])[1].item() == float("inf")


def test_combine_norms():
    parts = [torch.randn(5), torch.randn(7), torch.randn(2)]
    ref = torch.cat(parts).norm().item()
    assert stats.combine_norms([p.norm().item() for p in parts]) == pytest.approx(ref)
    assert stats.combine_norms([]) == 0.0
    assert math.isnan(stats.combine_norms([float("nan"), 1.0]))


def test_norms_match_one_norm_per_tensor_in_order():
    torch.manual_seed(0)
    tensors = [
        torch.randn(64),
        torch.randn(300, 300),
        torch.randn(64),
        torch.full((100,), 300.0, dtype=torch.float16),  # squared in fp16 it would overflow
        torch.randn(5, 5).t(),  # not contiguous
        torch.randn(64),
        torch.zeros(0),
        torch.tensor(3.0),  # 0-dim
        torch.sparse_coo_tensor([[0, 2]], [3.0, 4.0], (5,), check_invariants=True),
        torch.full((100,), 300.0, dtype=torch.float16),
        torch.randn(7, 3, dtype=torch.float64),
    ]
    expected = [
        t.coalesce().values().double().norm().item() if t.is_sparse else t.double().norm().item()
        for t in tensors
    ]
    got = stats.norms(tensors)
    assert got.dtype == torch.float32 and got.shape == (len(tensors),)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    one_group = [torch.randn(64) * k for k in range(4)]
    assert stats.norms(one_group).tolist() == pytest.approx([t.norm().item() for t in one_group])
    assert stats.norms([]).numel() == 0
