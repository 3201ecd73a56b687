"""The decoder: bag mode, the loss inside forward, causality, KV cache, presets and their parameter counts."""


import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, ModelConfig
from pipeline.model.transformer import PRESETS, Transformer, resolve_model_config


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(vocab=97, **kw):
    cfg = resolve_model_config(ModelConfig(preset="tiny", **kw), vocab_size=vocab)
    torch.manual_seed(0)
    m = Transformer(cfg)
    m.init_weights(0.05)
    return m.eval()


def ce_ref(logits, targets):
    """Paper Listing 3 read literally: mean-reduced CE per slot, uniform mean over slots with any valid target."""
    V = logits.shape[-1]
    losses = [
        F.cross_entropy(logits.reshape(-1, V).float(), targets[..., i].reshape(-1), ignore_index=-100)
        for i in range(targets.shape[-1])
        if (targets[..., i] != -100).any()
    ]
    return torch.stack(losses).mean()


def test_plain_ids_equal_bags_of_one():
    m = tiny()
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        a = m(ids)
        b = m(ids[..., None])
    assert a.shape == (2, 16, 97)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bag_of_identical_tokens_equals_the_token():
    m = tiny()
    ids = torch.randint(0, 97, (2, 16))
    tgt = torch.randint(0, 97, (2, 16))
    tgt[0, 3] = -100
    s = 4
    bags = ids[..., None].expand(2, 16, s)  # (B, L, s): the same token s times
    with torch.no_grad():
        torch.testing.assert_close(m(bags), m(ids), rtol=1e-5, atol=1e-5)
        plain = m(ids, tgt)
        bagged = m(bags, tgt[..., None].expand(2, 16, s))  # every slot predicts the same next token
    torch.testing.assert_close(bagged, plain, rtol=1e-5, atol=1e-5)


def test_loss_equals_cross_entropy_on_logits():
    m = tiny()
    ids = torch.randint(0, 97, (3, 12))
    tgt = torch.randint(0, 97, (3, 12))
    tgt[1, :5] = -100
    with torch.no_grad():
        logits = m(ids)
        want = F.cross_entropy(logits.reshape(-1, 97), tgt.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(m(ids, tgt), want, rtol=1e-5, atol=1e-6)  # (B, L) targets = s of 1
        torch.testing.assert_close(m(ids, tgt[..., None]), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m(ids, tgt[..., None], fused_chunk=7), want, rtol=1e-5, atol=1e-6)


def test_multi_hot_loss_matches_listing_3_on_logits():
    m = tiny()
    bags = torch.randint(0, 97, (2, 10, 3))
    tgt = torch.randint(0, 97, (2, 10, 3))
    tgt[:, -1, 1:] = -100  # slots past the end of the window
    with torch.no_grad():
        logits = m(bags)
        torch.testing.assert_close(m(bags, tgt), ce_ref(logits, tgt), rtol=1e-5, atol=1e-6)


def test_loss_backward_reaches_every_parameter():
    m = tiny().train()
    loss = m(torch.randint(0, 97, (2, 8, 2)), torch.randint(0, 97, (2, 8, 2)))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_causal():
    m = tiny()
    ids = torch.randint(0, 97, (1, 20))
    ids2 = ids.clone()
    ids2[0, 13] = (ids[0, 13] + 1) % 97
    bags = torch.randint(0, 97, (1, 20, 3))
    bags2 = bags.clone()
    bags2[0, 13, 1] = (bags[0, 13, 1] + 1) % 97
    with torch.no_grad():
        a, b = m(ids), m(ids2)
        torch.testing.assert_close(a[:, :13], b[:, :13], rtol=0, atol=1e-6)
        assert (a[:, 13:] - b[:, 13:]).abs().max() > 1e-4
        a, b = m(bags), m(bags2)
        torch.testing.assert_close(a[:, :13], b[:, :13], rtol=0, atol=1e-6)
        assert (a[:, 13:] - b[:, 13:]).abs().max() > 1e-4


def test_kv_cache_matches_full_forward():
    m = tiny()
    ids = torch.randint(0, 97, (2, 15))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 15)
        parts = [m(ids[:, :9], cache=cache, start_pos=0)]
        for t in range(9, 15):
            parts.append(m(ids[:, t : t + 1], cache=cache, start_pos=t))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_generate_greedy_equals_argmax_rollout():
    m = tiny()
    prompt = torch.randint(0, 97, (1, 5))
    out = m.generate(prompt, 6, temperature=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, m(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert out.tolist() == ids.tolist()
    g = torch.Generator().manual_seed(1)
    sampled = m.generate(prompt, 6, temperature=0.8, top_k=10, top_p=0.9, generator=g)
    assert sampled.shape == (1, 11) and sampled.max() < 97


def test_sampling_filters():
    from pipeline.model.transformer import sample_next

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0).tolist() == [1, 0]
    assert sample_next(logits, 1.0, top_k=1, generator=g).tolist() == [1, 0]
    assert sample_next(logits, 1.0, top_p=1e-3, generator=g).tolist() == [1, 0]
    draws = torch.stack([sample_next(logits, 1.0, top_k=2, generator=g) for _ in range(200)])  # (200, 2)
    assert set(draws[:, 0].tolist()) == {1, 3}  # only the two largest logits survive
    p1 = (draws[:, 0] == 1).float().mean().item()
    assert abs(p1 - torch.tensor([3.0, 2.9]).softmax(0)[0].item()) < 0.1


def test_hf_state_dict_names_round_trip():
    from pipeline.model.transformer import from_hf_state_dict, to_hf_state_dict

    sd = tiny().state_dict()
    hf = to_hf_state_dict(sd)
    assert "model.layers.3.self_attn.k_proj.weight" in hf and "model.embed_tokens.weight" in hf
    assert "lm_head.weight" in hf and "model.layers.0.mlp.gate_proj.weight" in hf
    assert list(from_hf_state_dict(hf)) == list(sd)


def test_init_is_deterministic_and_works_from_meta():
    cfg = resolve_model_config(ModelConfig(preset="tiny"), vocab_size=97)
    torch.manual_seed(3)
    a = Transformer(cfg)
    torch.manual_seed(3)
    a.init_weights()
    with torch.device("meta"):
        b = Transformer(cfg)
    b.to_empty(device="cpu")
    torch.manual_seed(3)
    b.init_weights()
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    assert abs(a.tok_embeddings.weight.std().item() - 0.02) < 2e-3
    assert torch.equal(a.norm.weight, torch.ones(128))


def test_resolve_model_config():
    c = resolve_model_config(ModelConfig(preset="tiny"), vocab_size=4099)
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size) == (128, 4, 4, 2, 384)
    assert c.vocab_size == 4099  # from the tokenizer
    assert resolve_model_config(ModelConfig(preset="tiny", vocab_size=5000), 4099).vocab_size == 5000  # config wins
    assert resolve_model_config(ModelConfig(preset="270M"), None).vocab_size == 128256  # preset reference
    assert resolve_model_config(ModelConfig(preset="3B", num_layers=2), 10).num_layers == 2
    with pytest.raises(ConfigError, match="model.preset"):
        resolve_model_config(ModelConfig(preset="7B"), 10)
    with pytest.raises(ConfigError, match="divisible"):
        resolve_model_config(ModelConfig(preset="tiny", num_kv_heads=3), 10)


def _count(preset, vocab=None):
    cfg = resolve_model_config(ModelConfig(preset=preset, vocab_size=vocab), None)
    with torch.device("meta"):
        return Transformer(cfg), cfg


def _formula(c):
    d, f, hd = c.hidden_size, c.intermediate_size, c.hidden_size // c.num_heads
    per_layer = d * hd * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * d * f + 2 * d
    return c.num_layers * per_layer + d, c.vocab_size * d


# Non-embedding counts, and the public totals of the SmolLM models whose shapes the presets use (those models tie
# their embeddings: total = non-embedding + one V x d matrix, at their own vocabularies).
PUBLIC = {
    "270M": (106_203_456, 49152, 134_515_008),  # SmolLM2-135M
    "600M": (314_635_200, 49152, 361_821_120),  # SmolLM2-360M
    "3B": (2_812_430_336, 128256, 3_075_098_624),  # SmolLM3-3B (3.08B on its model card)
}


@pytest.mark.parametrize("preset", [p for p in PRESETS if not PRESETS[p]["num_experts"]])  # MoE: test_moe.py
def test_param_counts_match_formula(preset):
    m, c = _count(preset)
    non_emb, emb = _formula(c)
    assert m.num_params(exclude_embedding=True) == non_emb
    assert m.num_params() == non_emb + 2 * emb  # untied
    if preset in PUBLIC:
        want_non_emb, public_vocab, public_total = PUBLIC[preset]
        assert non_emb == want_non_emb
        assert non_emb + public_vocab * c.hidden_size == public_total


@pytest.mark.parametrize("shape", [{}, {"num_kv_heads": 4, "qk_norm": True}], ids=["gqa", "mha-qknorm"])
@pytest.mark.parametrize("L", [16, 40])
def test_flops_per_position_against_torch_flop_counter(shape, L):
    """The training FLOPs the model claims (flops_per_position, used for MFU and compare's FLOP axis) against
    torch.utils.flop_counter counting the matmuls a forward + backward actually runs. How the two relate:
    - every matmul has its two backward matmuls (all weights and the embedding need gradients): backward = 2 x
      forward, for the linear layers and the attention alike;
    - the linear layers (aten.mm, LM head included: the logits path here, whose 3 matmuls are the ones the fused
      loss runs; FlopCounterMode misses the fused path's in-place addmm_) count 6 x (their parameters) per position;
    - attention under the math SDPA backend (the CPU flash kernel is not counted by FlopCounterMode) computes
      the full L x L scores and masks them (aten.bmm); the formula counts the causal half of that;
    - the formula multiplies all non-embedding parameters by 6, RMSNorm weights too, which run no matmul.
    So flops_per_position = (mm + bmm / 2) / positions + 6 x (RMSNorm weights), exactly."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.model.transformer import RMSNorm
    from tst_ops import multi_hot_cross_entropy

    m = tiny(vocab=97, **shape).train()
    B, s = 2, 3
    tokens, targets = torch.randint(0, 97, (B, L, s)), torch.randint(0, 97, (B, L, s))
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd:
            loss = multi_hot_cross_entropy(m(tokens), targets)
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
    f = {str(k): v for k, v in fwd.get_flop_counts()["Global"].items()}
    b = {str(k): v for k, v in bwd.get_flop_counts()["Global"].items()}
    assert set(f) == set(b) == {"aten.mm", "aten.bmm"}, (f, b)
    assert b["aten.mm"] == 2 * f["aten.mm"] and b["aten.bmm"] == 2 * f["aten.bmm"]
    norms = sum(p.numel() for mod in m.modules() if isinstance(mod, RMSNorm) for p in mod.parameters())
    counted = f["aten.mm"] + b["aten.mm"] + (f["aten.bmm"] + b["aten.bmm"]) // 2 + 6 * norms * B * L
    assert m.flops_per_position(L) * B * L == counted


def test_preset_totals():
    totals = {p: _count(p)[0].num_params() for p in PRESETS}
    assert totals["270M"] == 253_954_368
    assert totals["600M"] == 560_886_720
    assert totals["3B"] == 3_337_766_912
    assert totals["125M"] == 125_848_320
    assert 1_000_000 < _count("tiny", 4096)[0].num_params() < 2_000_000


def test_crossover_presets():
    """The crossover study's sizes (issue 19): 5M is tiny at hidden 256 / MLP 768 (the docs/results.md model)."""
    from pipeline.model.transformer import model_summary

    want = {"tiny": (1_836_160, 787_584), "5M": (5_245_184, 3_148_032), "13M": (13_472_640, 10_326_912),
            "29M": (29_368_832, 25_174_528)}
    for p, (total, non_emb) in want.items():
        s = model_summary(ModelConfig(preset=p), 4096, 128)
        assert (s["params"], s["params_non_embedding"]) == (total, non_emb), p
    assert model_summary(ModelConfig(preset="tiny", hidden_size=256, intermediate_size=768), 4096, 128)["params"] \
        == want["5M"][0]
