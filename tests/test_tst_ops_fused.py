"""Fused LM head + multi-hot cross-entropy (tst_ops.fused): same value and gradients as the reference.

The reference is ``multi_hot_cross_entropy(hidden @ W.T, ...)`` (tst_ops.loss), itself pinned to a naive
Listing 3 implementation in test_tst_ops.py.
"""

import pytest
import torch
import torch.nn.functional as F

from tst_ops import auto_chunk_size, fused_linear_multi_hot_cross_entropy, multi_hot_cross_entropy

IGN = -100


def make(N, D, V, s, dtype=torch.float32, seed=0, p_ignore=0.2, lead=()):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5 * 2
    t = torch.randint(0, V, (*lead, N, s), generator=g)
    t[torch.rand(*lead, N, s, generator=g) < p_ignore] = IGN
    if N > 1 and s > 1:
        t[..., 1, 1] = t[..., 1, 0]  # a duplicated token in a bag
    return h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), t


def ref_and_grads(h, w, t, weights="uniform", slot_counts=None):
    loss = multi_hot_cross_entropy(h @ w.t(), t, weights, slot_counts=slot_counts)
    return (loss, *torch.autograd.grad(loss, (h, w)))


def fused_and_grads(h, w, t, weights="uniform", slot_counts=None, chunk_size=None):
    loss = fused_linear_multi_hot_cross_entropy(h, w, t, weights, slot_counts=slot_counts, chunk_size=chunk_size)
    return (loss, *torch.autograd.grad(loss, (h, w)))


def test_gradcheck_float64():
    h, w, t = make(6, 4, 7, 3, torch.float64, p_ignore=0.25)
    for weights in ("uniform", "power"):
        assert torch.autograd.gradcheck(
            lambda h, w: fused_linear_multi_hot_cross_entropy(h, w, t, weights, chunk_size=4), (h, w)
        )
    counts = torch.tensor([9.0, 7.0, 0.0])  # global counts (this is one shard of a larger batch)
    assert torch.autograd.gradcheck(
        lambda h, w: fused_linear_multi_hot_cross_entropy(h, w, t, slot_counts=counts, chunk_size=5), (h, w)
    )


@pytest.mark.parametrize(
    "N,D,V,s,chunk,weights",
    [
        (1, 8, 50, 1, None, "uniform"),  # N = 1, s = 1
        (1, 8, 50, 4, 3, "power"),
        (37, 16, 101, 3, 7, "uniform"),  # odd chunk, V not a multiple of anything
        (64, 32, 97, 6, 64, "power"),  # one chunk
        (50, 24, 257, 16, 13, [float(i % 3 + 1) for i in range(16)]),
        (33, 16, 64, 2, 1, "uniform"),  # chunk of one row
    ],
)
def test_fused_matches_reference_float32(N, D, V, s, chunk, weights):
    h, w, t = make(N, D, V, s)
    lr, ghr, gwr = ref_and_grads(h, w, t, weights)
    lf, ghf, gwf = fused_and_grads(h, w, t, weights, chunk_size=chunk)
    assert lf.dtype == torch.float32
    assert lf.item() == pytest.approx(lr.item(), rel=2e-6)
    torch.testing.assert_close(ghf, ghr, rtol=1e-5, atol=2e-7)
    torch.testing.assert_close(gwf, gwr, rtol=1e-5, atol=2e-7)


def test_fused_float64_matches_reference_tightly_with_leading_dims():
    h, w, t = make(9, 8, 31, 4, torch.float64, lead=(2,))  # (B, L, D) hidden, (B, L, s) targets
    lr, ghr, gwr = ref_and_grads(h, w, t, "power")
    lf, ghf, gwf = fused_and_grads(h, w, t, "power", chunk_size=5)
    assert lf.item() == pytest.approx(lr.item(), rel=1e-13)
    torch.testing.assert_close(ghf, ghr, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(gwf, gwr, rtol=1e-12, atol=1e-15)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("chunk", [None, 5])
def test_fused_bfloat16_is_as_accurate_as_the_bf16_reference(chunk):
    h64, w64, t = make(40, 32, 301, 6, torch.float64)
    l64, gh64, gw64 = ref_and_grads(h64, w64, t)  # float64 truth
    hb = h64.detach().to(torch.bfloat16).requires_grad_()
    wb = w64.detach().to(torch.bfloat16).requires_grad_()
    lrb, ghrb, gwrb = ref_and_grads(hb, wb, t)  # unfused reference on bf16 inputs
    lf, ghf, gwf = fused_and_grads(hb, wb, t, chunk_size=chunk)
    assert ghf.dtype == gwf.dtype == torch.bfloat16
    # the same bf16 logits and float32 softmax: values agree with the bf16 reference closely
    assert lf.item() == pytest.approx(lrb.item(), rel=1e-5)
    # and both stay close to the float64 truth; the fused path is not worse than the reference
    assert abs(lf.item() - l64.item()) < 0.02
    for gf, gr, g64 in ((ghf, ghrb, gh64), (gwf, gwrb, gw64)):
        assert _rel(gf, g64) < 1.5e-2
        assert _rel(gf, g64) <= 1.5 * _rel(gr, g64) + 1e-3


def test_fused_s1_equals_cross_entropy():
    h, w, t = make(29, 16, 83, 1, torch.float64)
    lf, ghf, gwf = fused_and_grads(h, w, t, chunk_size=6)
    lc = F.cross_entropy(h @ w.t(), t[:, 0], ignore_index=IGN)
    ghc, gwc = torch.autograd.grad(lc, (h, w))
    assert lf.item() == pytest.approx(lc.item(), rel=1e-13)
    torch.testing.assert_close(ghf, ghc, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(gwf, gwc, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("weights", ["uniform", "power"])
def test_fused_slot_counts_shards_sum_to_the_global_loss(weights):
    h, w, t = make(30, 8, 41, 4, torch.float64, seed=5)
    t[:, 3] = IGN
    t[:10, 2] = IGN
    whole, gh_whole, gw_whole = ref_and_grads(h, w, t, weights)
    counts = (t != IGN).sum(0)
    total = sum(
        fused_linear_multi_hot_cross_entropy(h[a:b], w, t[a:b], weights, slot_counts=counts, chunk_size=4)
        for a, b in [(0, 10), (10, 11), (11, 30)]
    )
    gh, gw = torch.autograd.grad(total, (h, w))
    assert total.item() == pytest.approx(whole.item(), rel=1e-12)
    torch.testing.assert_close(gh, gh_whole, rtol=1e-11, atol=1e-14)
    torch.testing.assert_close(gw, gw_whole, rtol=1e-11, atol=1e-14)


def test_fused_all_ignored_is_zero_not_nan_and_grad_output_scales():
    h, w, _ = make(7, 4, 11, 2, torch.float64)
    t = torch.full((7, 2), IGN)
    loss, gh, gw = fused_and_grads(h, w, t, chunk_size=3)
    assert loss.item() == 0.0 and not gh.any() and not gw.any()
    h, w, t = make(7, 4, 11, 2, torch.float64)
    loss = fused_linear_multi_hot_cross_entropy(h, w, t, chunk_size=3)
    gh1, gw1 = torch.autograd.grad(loss, (h, w), retain_graph=True)
    gh3, gw3 = torch.autograd.grad(3.5 * loss, (h, w))
    torch.testing.assert_close(gh3, 3.5 * gh1)
    torch.testing.assert_close(gw3, 3.5 * gw1)


def test_fused_without_grad_and_frozen_weight():
    h, w, t = make(21, 8, 37, 3, torch.float64)
    ref = multi_hot_cross_entropy(h @ w.t(), t).item()
    with torch.no_grad():
        assert fused_linear_multi_hot_cross_entropy(h, w, t, chunk_size=4).item() == pytest.approx(ref, rel=1e-13)
    wf = w.detach()  # only hidden needs a gradient
    loss = fused_linear_multi_hot_cross_entropy(h, wf, t, chunk_size=4)
    (gh,) = torch.autograd.grad(loss, h)
    (ghr,) = torch.autograd.grad(multi_hot_cross_entropy(h @ wf.t(), t), h)
    torch.testing.assert_close(gh, ghr, rtol=1e-12, atol=1e-15)


def test_fused_rejects_mismatches():
    h, w, t = make(4, 8, 10, 2)
    with pytest.raises(ValueError):
        fused_linear_multi_hot_cross_entropy(h, w[:, :4], t)
    with pytest.raises(ValueError):
        fused_linear_multi_hot_cross_entropy(h, w.double(), t)
    with pytest.raises(ValueError):
        fused_linear_multi_hot_cross_entropy(h, w, t[:3])
    with pytest.raises(ValueError):
        fused_linear_multi_hot_cross_entropy(h, w, t, chunk_size=0)


def test_auto_chunk_size():
    # logits chunk ~ hidden size (N*D/V rows), >= 64 MiB of fp32 logits, >= 32 rows, power of two, <= N
    assert auto_chunk_size(8192, 1024, 32768) == 512  # N*D/V = 256 < 64 MiB / (4 * 32768) = 512 rows
    assert auto_chunk_size(16384, 2048, 128256) == 512  # 262 rows -> 512
    assert auto_chunk_size(65536, 2048, 32768) == 4096  # N*D/V = 4096 rows
    assert auto_chunk_size(100000, 128, 2**20) == 32  # at least 32 rows
    assert auto_chunk_size(10, 1024, 50) == 10  # capped at N
    assert auto_chunk_size(1, 8, 50) == 1
