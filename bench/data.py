"""Data-path throughput, side by side on the same cores in one run.

    python bench/data.py [--mb 30] [--tokenizer gpt2] [--bag-size 6] [--seq-len 128] [--batch 16] [--actors 1]

Prints tokens/s of
  1. HF `tokenizers` `encode_batch` alone on the corpus text (and `encode_batch_fast`), already in memory;
  2. the full Ray Data path, live: read JSONL shards from disk -> tokenize on the CPU actor pool -> ordered dealer
     -> superposition windows (B, s*L + s) delivered to a consumer through `iter_steps` (no cached dataset);
  3. what the trainer consumes: the tiny model's recovery-phase tokens/s (B*L per step, measured) times s, the
     raw tokens a superposition step reads;
and the ratios: Ray path / bare tokenizer (target >= 0.6 on 2 cores) and Ray path / trainer consumption.

The text is the builtin corpora (Wikipedia leads, then the KJV Bible, then pydoc) written as JSONL shards to a
temporary folder. The tokenizer benchmark uses the tokenizer's own thread pool (all cores), as `encode_batch`
does by default; the Ray path gets the same cores (Ray started with the machine's real CPU count as logical
CPUs unless --ray-cpus is given).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_corpus(out_dir: str, mb: float, shards: int) -> tuple[list[str], int]:
    from pipeline.corpus import builtin_documents

    docs, total = [], 0
    pool = [t for name in ("wiki", "bible", "pydoc") for t in builtin_documents(name)]
    i = 0
    while total < mb * 1e6:  # past the ~9.9 MB of builtins the text repeats (same tokenizer work per byte)
        t = pool[i % len(pool)]
        docs.append(t)
        total += len(t.encode())
        i += 1
    per = (len(docs) + shards - 1) // shards
    for i in range(shards):
        with open(os.path.join(out_dir, f"part-{i:03d}.jsonl"), "w") as f:
            for t in docs[i * per:(i + 1) * per]:
                f.write(json.dumps({"text": t}) + "\n")
    return docs, total


def bench_bare(tok, docs: list[str], batch: int) -> dict:
    be = tok.backend
    out = {}
    for name in ("encode_batch", "encode_batch_fast"):
        fn = getattr(be, name, None)
        if fn is None:
            continue
        t0 = time.perf_counter()
        n = 0
        for i in range(0, len(docs), batch):
            for e in fn(docs[i:i + batch], add_special_tokens=False):
                n += len(e.ids)
        dt = time.perf_counter() - t0
        out[name] = {"tokens": n + len(docs), "seconds": dt, "tokens_per_s": (n + len(docs)) / dt}
    return out


def bench_ray(cfg, out_dir: str) -> dict:
    from pipeline.data import build_source

    t0 = time.perf_counter()
    src = build_source(cfg, out_dir, "ray")  # starts the dealer, which starts the Ray Data pipeline
    t_build = time.perf_counter() - t0
    plan = src.plan
    t1 = time.perf_counter()
    first = None
    for t, w in src.iter_steps(0, 0, 1):
        assert w.shape == (plan.global_batch_size, plan.window_len(t))
        if first is None:
            first = time.perf_counter()
    t_end = time.perf_counter()
    tokens = plan.offset(plan.total_steps)
    per_step = plan.offset(1)
    info = src.info()
    src.close()
    return {
        "build_seconds": t_build, "tokens": tokens, "seconds": t_end - t0,
        "tokens_per_s": tokens / (t_end - t0),
        "from_request_tokens_per_s": tokens / (t_end - t1),
        "first_step_seconds": first - t1,
        "steady_tokens_per_s": (tokens - per_step) / max(1e-9, t_end - first),
        "dealer": {k: info[k] for k in ("restarts", "epoch", "delivered")},
    }


def bench_trainer(vocab: int, batch: int, seq_len: int, steps: int = 4) -> dict:
    import torch

    from pipeline.config import ModelConfig
    from pipeline.loop import make_batch
    from pipeline.model import Transformer, resolve_model_config

    torch.manual_seed(0)
    model = Transformer(resolve_model_config(ModelConfig(preset="tiny"), vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    windows = torch.randint(0, vocab, (batch, seq_len + 1))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        inputs, targets = make_batch(windows, 1, seq_len)
        loss = model(inputs, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    return {"step_seconds": step, "recovery_tokens_per_s": batch * seq_len / step, "params": model.num_params()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=30.0, help="MB of text (the builtins, repeated past 9.9 MB; default 30)")
    ap.add_argument("--source", default=None, help="a folder of JSONL shards (e.g. from `tst data build-corpus`) instead")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--tokenizer", default="gpt2")
    ap.add_argument("--bag-size", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--actors", type=int, default=1, help="tokenizer actors (default 1)")
    ap.add_argument("--actor-cpus", type=float, default=None, help="CPUs (= tokenizer threads) per actor; default cores/actors")
    ap.add_argument("--tokenize-batch", type=int, default=512)
    ap.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs for ray.init (default: real cores + 2)")
    ap.add_argument("--skip-trainer", action="store_true")
    args = ap.parse_args(argv)

    cores = os.cpu_count() or 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import ray
    from ray.data import DataContext

    from pipeline.config import Config, apply_overrides
    from pipeline.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="tst-bench-data-") as tmp:
        if args.source:
            corpus = os.path.abspath(args.source)
            docs = [json.loads(line)["text"] for f in sorted(os.listdir(corpus)) if f.endswith(".jsonl")
                    for line in open(os.path.join(corpus, f), encoding="utf-8")]
            nbytes = sum(len(t.encode()) for t in docs)
            args.shards = len([f for f in os.listdir(corpus) if f.endswith(".jsonl")])
        else:
            corpus = os.path.join(tmp, "corpus")
            os.makedirs(corpus)
            docs, nbytes = write_corpus(corpus, args.mb, args.shards)
        actor_cpus = args.actor_cpus or max(1.0, cores / args.actors)
        base = {"data.source": corpus, "data.tokenizer": args.tokenizer, "data.val_fraction": 0.0,
                "data.bag_size": args.bag_size, "data.seq_len": args.seq_len, "train.global_batch_size": args.batch,
                "train.switch_fraction": 1.0, "train.steps": 1, "data.num_tokenize_actors": args.actors,
                "data.tokenize_actor_cpus": actor_cpus, "data.tokenize_batch_size": args.tokenize_batch,
                "data.dealer_cache_mb": 0, "data.prefetch_steps": 4}
        cfg = apply_overrides(Config(), base)
        tok = load_tokenizer(cfg.data, os.path.join(tmp, "out"))
        print(f"corpus: {len(docs)} documents, {nbytes / 1e6:.1f} MB in {args.shards} JSONL shards; tokenizer {args.tokenizer} "
              f"(vocab {tok.vocab_size}); {cores} cores", flush=True)

        bare = bench_bare(tok, docs, args.tokenize_batch)
        n_tokens = bare["encode_batch"]["tokens"]
        steps = n_tokens // (args.batch * args.bag_size * args.seq_len) - 1
        cfg = apply_overrides(cfg, {"train.steps": steps})

        ray.init(address="local", num_cpus=args.ray_cpus or cores + 2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        DataContext.get_current().enable_progress_bars = False
        rp = bench_ray(cfg, os.path.join(tmp, "out"))
        ray.shutdown()
        tr = None if args.skip_trainer else bench_trainer(tok.vocab_size, args.batch, args.seq_len)

    b, bf = bare["encode_batch"], bare.get("encode_batch_fast")
    best_bare = max(b["tokens_per_s"], bf["tokens_per_s"] if bf else 0)
    print()
    print(f"{'path':58s} {'tokens':>11s} {'seconds':>8s} {'tokens/s':>11s}")
    print(f"{'HF tokenizers encode_batch (text in memory)':58s} {b['tokens']:>11,d} {b['seconds']:>8.2f} {b['tokens_per_s']:>11,.0f}")
    if bf:
        print(f"{'HF tokenizers encode_batch_fast (text in memory)':58s} {bf['tokens']:>11,d} {bf['seconds']:>8.2f} {bf['tokens_per_s']:>11,.0f}")
    print(f"{'Ray Data: read+tokenize+pack s=%d windows -> consumer' % args.bag_size:58s} {rp['tokens']:>11,d} "
          f"{rp['seconds']:>8.2f} {rp['tokens_per_s']:>11,.0f}")
    print(f"{'  same, timed from the first request (source built)':58s} {'':>11s} {'':>8s} {rp['from_request_tokens_per_s']:>11,.0f}")
    print(f"{'  same, after the first step (steady state)':58s} {'':>11s} {'':>8s} {rp['steady_tokens_per_s']:>11,.0f}")
    print(f"  (end to end includes start-up: source build with driver preflight {rp['build_seconds']:.1f}s, first step "
          f"{rp['first_step_seconds']:.1f}s after it; {args.actors} tokenizer actor(s) x {actor_cpus:g} CPU)")
    print()
    print(f"ratio Ray path (end to end) / encode_batch:   {rp['tokens_per_s'] / b['tokens_per_s']:.2f}x  (target >= 0.6)")
    print(f"ratio Ray path (steady)     / encode_batch:   {rp['steady_tokens_per_s'] / b['tokens_per_s']:.2f}x")
    if bf:
        print(f"ratio Ray path (end to end) / encode_batch_fast: {rp['tokens_per_s'] / bf['tokens_per_s']:.2f}x")
    if tr:
        sup = tr["recovery_tokens_per_s"] * args.bag_size
        print(f"trainer (tiny model, {tr['params'] / 1e6:.1f}M params, B={args.batch}, L={args.seq_len}, CPU): "
              f"{tr['recovery_tokens_per_s']:,.0f} tokens/s in recovery -> {sup:,.0f} tokens/s read in superposition (x s={args.bag_size})")
        print(f"ratio Ray path / trainer superposition consumption: {rp['tokens_per_s'] / sup:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
