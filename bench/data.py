"""The data path, measured side by side in one run on this machine (tokenizing and reading timed separately).

    python bench/data.py [--mb 100] [--source DIR] [--tokenizer gpt2] [--skip-ray] [--skip-s3]

Prints
  1. prepare: HF `tokenizers` `encode_batch` alone on the corpus text already in memory (all cores), against the
     token store's prepare over the same files, by Ray Data (read tasks -> tokenizer actor pool -> ordered writer;
     start-up included) and in-process (`--no-ray`). Target: Ray prepare >= 0.8x encode_batch on a 100 MB corpus.
  2. read: superposition windows of one rank from the local store (memory-mapped), and of 4 concurrent reader
     processes (4 ranks of one run). Target: >= 20M tokens/s for one rank.
  3. object storage: the same store on a local S3-compatible server (moto): bytes and GET requests per rank per
     step, with sequential read-ahead.
  4. resume: time from opening the store to the first batch at 0%, 50% and 90% of an epoch, in a fresh process
     (imports excluded, reported separately). Target: 90% within 1.2x of 0%.

The corpus is the builtin corpora (Wikipedia leads, the KJV Bible, pydoc) repeated to --mb as JSONL shards, or
--source (e.g. a folder from `tst data build-corpus`). Everything here calls the package (`pipeline.data`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_corpus(out_dir: str, mb: float, shards: int) -> tuple[list[str], int]:
    from pipeline.data.corpus import builtin_documents

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
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(docs), batch):
        for e in tok.backend.encode_batch(docs[i:i + batch], add_special_tokens=False):
            n += len(e.ids)
    dt = time.perf_counter() - t0
    return {"tokens": n + len(docs), "seconds": dt, "tokens_per_s": (n + len(docs)) / dt}


def bench_prepare(cfg, tok, out: str, mode: str) -> dict:
    from pipeline.data import ensure_store
    from pipeline.data.reader import TokenStore

    t0 = time.perf_counter()
    prep = ensure_store(cfg.data, tok, out, mode, wait="complete")
    dt = time.perf_counter() - t0
    st = TokenStore(prep.uri)
    n = st.tokens("train") + st.tokens("val")
    return {"uri": prep.uri, "tokens": n, "seconds": dt, "tokens_per_s": n / dt, "here": prep.prepared_here}


READER = r"""
import json, sys, time
from pipeline.data.plan import StreamPlan
from pipeline.data.batch import StoreSource
a = json.loads(sys.argv[1])
plan = StreamPlan(**a["plan"])
src = StoreSource(a["uri"], plan, verify=False, read_block_mb=a.get("block_mb", 1.0))
t0 = time.perf_counter()
it = src.iter_steps(a["start"], a["rank"], a["world"])
_, w = next(it)
first = time.perf_counter() - t0
n = 0
st = src.store
b0, r0 = st.bytes_read, st.requests  # object storage: what the first step's cold blocks cost, apart
t1 = time.perf_counter()
for _ in range(a["steps"] - 1):  # the steady rate: after the first batch (thread start, cold pages)
    _, w = next(it)
    n += w.numel()
dt = time.perf_counter() - t1
it.close()
st = src.store
print(json.dumps({"first_s": first, "seconds": dt, "tokens": n, "window_tokens": int(w.shape[1]),
                  "bytes": st.bytes_read, "requests": st.requests, "bytes_after_first": st.bytes_read - b0,
                  "requests_after_first": st.requests - r0}))
"""


def run_reader(args: dict, env=None) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", READER, json.dumps(args)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO, **(env or {})), check=False)
    if p.returncode:
        raise SystemExit(f"reader failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


def plan_dict(steps: int, s: int, L: int, B: int) -> dict:
    return {"total_steps": steps, "switch_fraction": 1.0, "bag_size": s, "seq_len": L, "global_batch_size": B,
            "val_windows": 0, "prefetch_steps": 2}


def start_moto() -> tuple[subprocess.Popen, str]:
    # this interpreter's moto (a moto_server found first on PATH may be another install, e.g. 5.2, whose
    # CompleteMultipartUpload answers break pyarrow's S3 writes)
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    return proc, f"http://127.0.0.1:{port}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=100.0, help="MB of text (the builtins, repeated past 9.9 MB)")
    ap.add_argument("--source", default=None, help="a folder of JSONL shards (e.g. from `tst data build-corpus`)")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--tokenizer", default="gpt2")
    ap.add_argument("--bag-size", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=1024, help="L of the read benchmark (default 1024)")
    ap.add_argument("--batch", type=int, default=32, help="global batch of the read benchmark (default 32)")
    ap.add_argument("--read-steps", type=int, default=40)
    ap.add_argument("--actors", type=int, default=1, help="tokenizer actors (default 1)")
    ap.add_argument("--tokenize-batch", type=int, default=512)
    ap.add_argument("--skip-ray", action="store_true", help="no Ray Data prepare (in-process only)")
    ap.add_argument("--skip-s3", action="store_true")
    ap.add_argument("--s3-steps", type=int, default=100, help="steps read from the S3 store (default 100)")
    ap.add_argument("--keep", default=None, help="keep the corpus and stores in this folder")
    args = ap.parse_args(argv)

    cores = os.cpu_count() or 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from pipeline.config import Config, apply_overrides
    from pipeline.data.tokenizer import load_tokenizer

    tmp = args.keep or tempfile.mkdtemp(prefix="tst-bench-data-")
    os.makedirs(tmp, exist_ok=True)
    if args.source:
        corpus = os.path.abspath(args.source)
        docs = [json.loads(line)["text"] for f in sorted(os.listdir(corpus)) if f.endswith(".jsonl")
                for line in open(os.path.join(corpus, f), encoding="utf-8")]
        nbytes = sum(len(t.encode()) for t in docs)
    else:
        corpus = os.path.join(tmp, "corpus")
        if os.path.isdir(corpus):
            shutil.rmtree(corpus)
        os.makedirs(corpus)
        docs, nbytes = write_corpus(corpus, args.mb, args.shards)
    base = {"data.source": corpus, "data.tokenizer": args.tokenizer, "data.val_fraction": 0.001,
            "data.num_tokenize_actors": args.actors, "data.tokenize_actor_cpus": max(1.0, cores / args.actors),
            "data.tokenize_batch_size": args.tokenize_batch, "data.read_cpus": 0.25}
    cfg = apply_overrides(Config(), base)
    tok = load_tokenizer(cfg.data, os.path.join(tmp, "out"))
    print(f"corpus: {len(docs)} documents, {nbytes / 1e6:.1f} MB of JSONL text; tokenizer {args.tokenizer} "
          f"(vocab {tok.vocab_size}); {cores} cores", flush=True)

    rows = []
    bare = bench_bare(tok, docs, args.tokenize_batch)
    del docs
    rows.append(("HF tokenizers encode_batch (text in memory)", bare))
    res = {"bare": bare}
    if not args.skip_ray:
        import ray
        from ray.data import DataContext

        ray.init(address="local", num_cpus=cores + 2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        DataContext.get_current().enable_progress_bars = False
        res["ray"] = bench_prepare(cfg, tok, os.path.join(tmp, "ray"), "ray")
        ray.shutdown()
        rows.append(("prepare, Ray Data (read tasks -> tokenizer actor -> writer)", res["ray"]))
    res["local"] = bench_prepare(cfg, tok, os.path.join(tmp, "local"), "local")
    rows.append(("prepare, in-process (--no-ray)", res["local"]))
    uri = res["local"]["uri"]

    from pipeline.data.reader import TokenStore

    n_train = TokenStore(uri).tokens("train")
    s, L, B = args.bag_size, args.seq_len, args.batch
    per_step = B * s * L
    steps_epoch = n_train // per_step
    # 2. read throughput: one rank (world 1), then 4 concurrent ranks of one run
    one = run_reader({"uri": uri, "plan": plan_dict(steps_epoch, s, L, B), "start": 0, "rank": 0, "world": 1,
                      "steps": min(args.read_steps, steps_epoch)})
    procs = [subprocess.Popen([sys.executable, "-c", READER, json.dumps(
        {"uri": uri, "plan": plan_dict(steps_epoch, s, L, B), "start": 0, "rank": r, "world": 4,
         "steps": min(args.read_steps, steps_epoch)})], stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=REPO)) for r in range(4)]
    four = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    # 4. resume: first batch at 0 / 50 / 90 % of an epoch, each in a fresh process
    resume = {}
    for frac in (0.0, 0.5, 0.9):
        start = int(frac * (steps_epoch - 1))
        r = run_reader({"uri": uri, "plan": plan_dict(steps_epoch, s, L, B), "start": start, "rank": 0, "world": 1,
                        "steps": 1})
        resume[frac] = r
    # 3. object storage
    s3 = None
    if not args.skip_s3:
        proc, endpoint = start_moto()
        try:
            import boto3

            env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_ENDPOINT_URL": endpoint}
            os.environ.update(env)
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
            s3_store = f"s3://bench/stores/{os.path.basename(uri)}"
            from pipeline.data.store import Storage

            dst = Storage(s3_store)
            for name in sorted(os.listdir(uri)):  # the same bytes, uploaded whole (the index last)
                if name != "index.json":
                    dst.write(name, open(os.path.join(uri, name), "rb").read())
            dst.write("index.json", open(os.path.join(uri, "index.json"), "rb").read())
            steps = min(args.s3_steps, steps_epoch)
            s3 = run_reader({"uri": s3_store, "plan": plan_dict(steps_epoch, s, L, B), "start": 0, "rank": 0,
                             "world": 4, "steps": steps}, env)
            s3["steps"] = steps
        finally:
            proc.terminate()

    print()
    print(f"{'prepare (tokenize once)':62s} {'tokens':>12s} {'seconds':>8s} {'tokens/s':>12s}")
    for name, r in rows:
        print(f"{name:62s} {r['tokens']:>12,d} {r['seconds']:>8.2f} {r['tokens_per_s']:>12,.0f}")
    if "ray" in res:
        print(f"ratio Ray Data prepare / encode_batch: {res['ray']['tokens_per_s'] / bare['tokens_per_s']:.2f}x "
              f"(target >= 0.8)")
    print(f"ratio in-process prepare / encode_batch: {res['local']['tokens_per_s'] / bare['tokens_per_s']:.2f}x")
    print()
    print(f"read (superposition windows s={s}, L={L}, global batch {B}: {per_step:,} tokens per step; store "
          f"{n_train:,} train tokens, {steps_epoch} steps per epoch)")
    r1 = one["tokens"] / one["seconds"]
    print(f"  one rank, local store (mmap):        {r1:>14,.0f} tokens/s over {min(args.read_steps, steps_epoch) - 1} steps "
          f"after the first (target >= 20,000,000)")
    agg = sum(f["tokens"] for f in four) / max(f["seconds"] for f in four)
    print(f"  4 concurrent reader processes:       {agg:>14,.0f} tokens/s together "
          f"({', '.join('%.1fM' % (f['tokens'] / f['seconds'] / 1e6) for f in four)} each)")
    if s3:
        k = s3["steps"] - 1
        print(f"  S3 (moto), rank 0 of 4 ({B // 4} lanes), {s3['steps']} steps, 1 MB blocks: after the first step "
              f"{s3['bytes_after_first'] / k / 1e6:.3f} MB and {s3['requests_after_first'] / k:.2f} GET requests per "
              f"step; the first step {(s3['bytes'] - s3['bytes_after_first']) / 1e6:.1f} MB in "
              f"{s3['requests'] - s3['requests_after_first']} GETs (cold blocks); the windows themselves: "
              f"{per_step // 4 * 2 / 1e6:.3f} MB per step per rank")
    print()
    print("resume: open the store and read the first batch at a fraction of an epoch (fresh process each)")
    for frac, r in resume.items():
        print(f"  at {frac:>4.0%} of the epoch: first batch {r['first_s'] * 1000:8.1f} ms after opening "
              f"(process incl. imports {r['process_s']:.2f} s)")
    ratio = resume[0.9]["first_s"] / resume[0.0]["first_s"]
    print(f"  ratio 90% / 0%: {ratio:.2f}x (target <= 1.2)")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
