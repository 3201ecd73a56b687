"""Bags, next-bag targets, bag embedding and the multi-hot cross-entropy reference (tst_ops.bags, tst_ops.loss).

Semantics are pinned with numbers: hand-computed cases, and parity with a deliberately naive, loop-based
implementation of the paper's Listing 3 alignment (pad next-token labels with s-1 ignores, drop the first s-1,
view as (B, L, s), loop over slots with F.cross_entropy).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from tst_ops import (
    bag_embedding,
    fold_bags,
    multi_hot_cross_entropy,
    next_bag_targets,
    slot_weights,
)

IGN = -100


# ---------------------------------------------------------------- naive references (deliberately simple)


def naive_listing3_targets(window, s, L):
    """Listing 3 literally: next-token labels, pad right with s-1 ignores, drop the first s-1, view (B, L, s)."""
    B, W = window.shape
    out = torch.full((B, L, s), IGN, dtype=torch.int64)
    for b in range(B):
        labels = [int(window[b, k + 1]) for k in range(W - 1)]  # next-token labels of the window
        shifted = (labels + [IGN] * (s - 1))[s - 1 :]
        for j in range(L):
            for i in range(s):
                out[b, j, i] = shifted[j * s + i]
    return out


def naive_mce(logits, targets, weights):
    """Weighted mean over slots of F.cross_entropy, slots without a valid target dropped."""
    V, s = logits.shape[-1], targets.shape[-1]
    z, t = logits.reshape(-1, V).double(), targets.reshape(-1, s)
    num, den = 0.0, 0.0
    for i in range(s):
        if (t[:, i] != IGN).any():
            num = num + weights[i] * F.cross_entropy(z, t[:, i], ignore_index=IGN)
            den += weights[i]
    return num / den


# ---------------------------------------------------------------- fold_bags


def test_fold_bags_values_and_view():
    tokens = torch.arange(24).view(2, 12)
    bags = fold_bags(tokens, 3)
    assert bags.shape == (2, 4, 3)
    assert bags[0, 1].tolist() == [3, 4, 5] and bags[1, 3].tolist() == [21, 22, 23]
    assert bags.data_ptr() == tokens.data_ptr()  # a view, no copy
    assert torch.equal(fold_bags(tokens, 1)[..., 0], tokens)


@pytest.mark.parametrize("bad", [5, 0, -1, 2.0])
def test_fold_bags_rejects_bad_sizes(bad):
    with pytest.raises(ValueError):
        fold_bags(torch.arange(24).view(2, 12), bad)


# ---------------------------------------------------------------- next_bag_targets


def test_next_bag_targets_hand_cases():
    full = torch.arange(10, 18).view(1, 8)  # s*L + s with s=2, L=3
    assert next_bag_targets(full, 2).tolist() == [[[12, 13], [14, 15], [16, 17]]]
    paper = torch.arange(10, 17).view(1, 7)  # s*L + 1: the last bag keeps one target
    assert next_bag_targets(paper, 2).tolist() == [[[12, 13], [14, 15], [16, IGN]]]
    assert next_bag_targets(paper, 2, ignore_index=-1).tolist() == [[[12, 13], [14, 15], [16, -1]]]
    one = torch.tensor([[5, 6, 7, 8]])  # s = 1: ordinary next-token targets of a (B, L+1) window
    assert next_bag_targets(one, 1).tolist() == [[[6], [7], [8]]]
    assert next_bag_targets(torch.tensor([[1, 2, 3, 4]], dtype=torch.int32), 1).dtype == torch.int64


@pytest.mark.parametrize("s", [1, 2, 3, 5])
@pytest.mark.parametrize("form", ["paper", "full"])
def test_next_bag_targets_match_naive_listing3(s, form):
    g = torch.Generator().manual_seed(s)
    B, L = 3, 4
    W = s * L + 1 if form == "paper" else s * L + s
    window = torch.randint(0, 1000, (B, W), generator=g)
    got = next_bag_targets(window, s)
    expect = naive_listing3_targets(window, s, L)
    if form == "full":  # the pipeline's longer window fills the last bag's slots the listing ignores
        expect[:, -1, :] = window[:, s * L : s * L + s]
    assert torch.equal(got, expect)
    # alignment as the paper states it: bag j predicts raw tokens (j+1)*s .. (j+2)*s-1
    for j in range(L):
        for i in range(s):
            if (j + 1) * s + i < W:
                assert torch.equal(got[:, j, i], window[:, (j + 1) * s + i])


@pytest.mark.parametrize("W", [7, 10, 3, 4])
def test_next_bag_targets_rejects_ambiguous_lengths(W):
    with pytest.raises(ValueError):
        next_bag_targets(torch.zeros(1, W, dtype=torch.long), 4)  # neither 4L+4 nor 4L+1 with L >= 1 (9 = 4*2+1 would be valid)


def test_document_mask_policy_hand_cases():
    EOS = 9
    window = torch.tensor([[1, 2, EOS, 4, 5, 6, 7, 8]])  # s=2, L=3; doc 0 = [1, 2, EOS]
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    # default "cross": targets flow over the boundary like packed next-token training
    assert next_bag_targets(window, 2).tolist() == [[[EOS, 4], [5, 6], [7, 8]]]
    # "mask": bag [1, 2] (doc 0) keeps EOS (it belongs to doc 0) but not doc 1's first token
    assert next_bag_targets(window, 2, doc_ids=docs).tolist() == [[[EOS, IGN], [5, 6], [7, 8]]]
    # a bag ending on EOS predicts nothing of the next document
    window2 = torch.tensor([[1, EOS, 3, 4, 5, 6, 7]])  # s*L + 1 form
    docs2 = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    assert next_bag_targets(window2, 2, doc_ids=docs2).tolist() == [[[IGN, IGN], [5, 6], [7, IGN]]]


def test_document_mask_with_s1_is_ordinary_document_masking():
    g = torch.Generator().manual_seed(0)
    window = torch.randint(0, 50, (2, 17), generator=g)
    docs = torch.cumsum((torch.rand(2, 17, generator=g) < 0.2).long(), dim=1)
    got = next_bag_targets(window, 1, doc_ids=docs)[..., 0]  # (B, L)
    expect = torch.where(docs[:, 1:] == docs[:, :-1], window[:, 1:], torch.full_like(window[:, 1:], IGN))
    assert torch.equal(got, expect)


def test_document_mask_random_matches_naive_rule():
    g = torch.Generator().manual_seed(1)
    s, L = 4, 5
    window = torch.randint(0, 50, (2, s * L + s), generator=g)
    docs = torch.cumsum((torch.rand(2, s * L + s, generator=g) < 0.15).long(), dim=1)
    got = next_bag_targets(window, s, doc_ids=docs)
    for b in range(2):
        for j in range(L):
            for i in range(s):
                pos = (j + 1) * s + i
                keep = docs[b, pos] == docs[b, j * s + s - 1]
                assert got[b, j, i] == (window[b, pos] if keep else IGN)


# ---------------------------------------------------------------- bag_embedding


def test_bag_embedding_is_the_mean_with_duplicates():
    weight = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, 6.0], [10.0, 20.0]], requires_grad=True)
    bags = torch.tensor([[[1, 1, 2], [3, 2, 1]]])  # (1, 2, 3)
    out = bag_embedding(bags, weight)
    torch.testing.assert_close(out, torch.tensor([[[5 / 3, 10 / 3], [14 / 3, 28 / 3]]]))
    out.sum().backward()  # d/dW: each occurrence contributes 1/s per dimension
    assert weight.grad[:, 0].tolist() == pytest.approx([0.0, 3 / 3, 2 / 3, 1 / 3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bag_embedding_s1_equals_embedding_exactly(dtype):
    weight = torch.randn(50, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    ids = torch.randint(0, 50, (3, 7))
    assert torch.equal(bag_embedding(ids.unsqueeze(-1), weight), F.embedding(ids, weight))
    assert torch.equal(bag_embedding(ids, weight), F.embedding(ids, weight))


def test_bag_embedding_accumulates_bf16_in_float32():
    # in bf16, 1 + 2^-8 rounds back to 1, so a bf16 sum would give 0.25; float32 accumulation does not
    weight = torch.tensor([[1.0], [2.0**-8]], dtype=torch.bfloat16)
    out = bag_embedding(torch.tensor([[[0, 1, 1, 1]]]), weight)
    assert out.dtype == torch.bfloat16
    expected = torch.tensor((1 + 3 * 2.0**-8) / 4).to(torch.bfloat16)  # 0.25390625 after rounding
    assert out.item() == expected.item() == 0.25390625


# ---------------------------------------------------------------- multi_hot_cross_entropy


def test_slot_weights():
    assert slot_weights("uniform", 3).tolist() == [1.0, 1.0, 1.0]
    assert slot_weights("power", 4).tolist() == [1.0, 0.5, 1 / 3, 0.25]
    assert slot_weights([2, 1], 2).tolist() == [2.0, 1.0]
    for bad in ("linear", [1.0], [1.0, -1.0]):
        with pytest.raises(ValueError):
            slot_weights(bad, 2)


def test_mce_hand_cases_duplicates_get_k_over_s():
    logits = torch.tensor([[0.0, 0.0, math.log(2.0)]])  # softmax = [1/4, 1/4, 1/2]
    ln2 = math.log(2.0)
    assert multi_hot_cross_entropy(logits, torch.tensor([[2, 2]])).item() == pytest.approx(ln2)
    assert multi_hot_cross_entropy(logits, torch.tensor([[0, 2]])).item() == pytest.approx(1.5 * ln2)
    # bag [2, 2, 0]: token 2 gets 2/3 of the mass -> cross-entropy against the soft target [1/3, 0, 2/3]
    soft = torch.tensor([[1 / 3, 0.0, 2 / 3]])
    got = multi_hot_cross_entropy(logits, torch.tensor([[2, 2, 0]]))
    assert got.item() == pytest.approx(F.cross_entropy(logits, soft).item())
    assert got.item() == pytest.approx((2 * ln2 + 2 * ln2) / 3)


def test_mce_equals_soft_target_cross_entropy_on_random_data():
    g = torch.Generator().manual_seed(0)
    s, V = 6, 11
    logits = torch.randn(40, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (40, s), generator=g)
    soft = F.one_hot(targets, V).double().mean(1)  # (N, V) k/s mass per token
    assert multi_hot_cross_entropy(logits, targets).item() == pytest.approx(
        F.cross_entropy(logits, soft).item(), rel=1e-12
    )


def test_mce_ignored_slots_and_power_weights_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64)
    lsm = torch.log_softmax(logits, -1)
    ce = lambda n, k: -lsm[n, k].item()  # noqa: E731
    targets = torch.tensor([[0, IGN], [1, 2]])
    slot0 = (ce(0, 0) + ce(1, 1)) / 2
    slot1 = ce(1, 2)  # the only valid slot-1 target
    assert multi_hot_cross_entropy(logits, targets).item() == pytest.approx((slot0 + slot1) / 2, rel=1e-12)
    assert multi_hot_cross_entropy(logits, targets, "power").item() == pytest.approx(
        (slot0 + slot1 / 2) / 1.5, rel=1e-12
    )
    assert multi_hot_cross_entropy(logits, targets, torch.tensor([3.0, 1.0])).item() == pytest.approx(
        (3 * slot0 + slot1) / 4, rel=1e-12
    )
    t3 = torch.tensor([[2, 1, 0]])
    expect = (ce(0, 2) + ce(0, 1) / 2 + ce(0, 0) / 3) / (1 + 1 / 2 + 1 / 3)
    assert multi_hot_cross_entropy(logits[:1], t3, "power").item() == pytest.approx(expect, rel=1e-12)


def test_mce_empty_slots_drop_out_and_never_nan():
    logits = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[1, IGN], [2, IGN], [IGN, IGN]])
    only_slot0 = F.cross_entropy(logits, t[:, 0], ignore_index=IGN)
    assert multi_hot_cross_entropy(logits, t, "power").item() == pytest.approx(only_slot0.item(), rel=1e-12)
    none = multi_hot_cross_entropy(logits, torch.full((3, 2), IGN))
    assert none.item() == 0.0
    (g,) = torch.autograd.grad(none, logits)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mce_s1_equals_cross_entropy(dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 13, generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, 13, (2, 9), generator=g)
    t[0, :3] = IGN
    a = multi_hot_cross_entropy(logits, t.unsqueeze(-1))
    b = F.cross_entropy(logits.reshape(-1, 13), t.reshape(-1), ignore_index=IGN)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert a.item() == pytest.approx(b.item(), rel=tol)
    ga, gb = torch.autograd.grad(a, logits), torch.autograd.grad(b, logits)
    torch.testing.assert_close(ga[0], gb[0], rtol=tol, atol=tol)


@pytest.mark.parametrize("weights", ["uniform", "power", [0.5, 2.0, 1.0]])
@pytest.mark.parametrize("form", ["paper", "full"])
def test_pipeline_alignment_and_loss_match_naive_listing(weights, form):
    """window -> next_bag_targets -> MCE equals Listing 3 done by hand, on random data (loop over slots)."""
    g = torch.Generator().manual_seed(7)
    s, L, B, V = 3, 5, 2, 17
    W = s * L + 1 if form == "paper" else s * L + s
    window = torch.randint(0, V, (B, W), generator=g)
    logits = torch.randn(B, L, V, generator=g, dtype=torch.float64, requires_grad=True)
    targets = next_bag_targets(window, s)
    naive_t = naive_listing3_targets(window, s, L)
    if form == "full":
        naive_t[:, -1, :] = window[:, s * L :]
    w = slot_weights(weights, s).tolist()
    got = multi_hot_cross_entropy(logits, targets, weights)
    ref = naive_mce(logits, naive_t, w)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    ga, gr = torch.autograd.grad(got, logits), torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ga[0], gr[0], rtol=1e-10, atol=1e-12)


def _global_counts(targets):
    return (targets.reshape(-1, targets.shape[-1]) != IGN).sum(0)


@pytest.mark.parametrize("weights", ["uniform", "power"])
def test_slot_counts_shards_sum_to_the_global_loss(weights):
    g = torch.Generator().manual_seed(3)
    N, V, s = 23, 9, 4
    logits = torch.randn(N, V, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N, s), generator=g)
    t[torch.rand(N, s, generator=g) < 0.3] = IGN
    t[:, 3] = IGN  # a slot with no valid target anywhere drops out
    t[:8, 2] = IGN  # shard 0 has no slot-2 target at all
    whole = multi_hot_cross_entropy(logits, t, weights)
    counts = _global_counts(t)
    parts = [(0, 8), (8, 9), (9, 23)]  # unequal shards (ranks x micro-batches)
    total = sum(multi_hot_cross_entropy(logits[a:b], t[a:b], weights, slot_counts=counts) for a, b in parts)
    assert total.item() == pytest.approx(whole.item(), rel=1e-12)
    g_whole = torch.autograd.grad(whole, logits)[0]
    g_parts = torch.autograd.grad(total, logits)[0]
    torch.testing.assert_close(g_parts, g_whole, rtol=1e-12, atol=1e-14)
    # without slot_counts a shard is just the loss of its own rows
    assert multi_hot_cross_entropy(logits[9:], t[9:], weights, slot_counts=_global_counts(t[9:])).item() == (
        pytest.approx(multi_hot_cross_entropy(logits[9:], t[9:], weights).item(), rel=1e-12)
    )


def test_bf16_logits_are_upcast():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=g).to(torch.bfloat16)
    t = torch.randint(0, 50, (16, 3), generator=g)
    got = multi_hot_cross_entropy(logits, t)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(multi_hot_cross_entropy(logits.double(), t).item(), rel=1e-6)
