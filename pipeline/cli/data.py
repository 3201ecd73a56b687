"""`tst data inspect`, `tst tokenizer train`, `tst data build-corpus`, `tst data chunk-corpus`.

    tst data prepare [--config recipes/tiny.yaml] [--no-ray] [key=value ...]   # tokenize once into the token store
    tst data inspect --config recipes/tiny.yaml [key=value ...]   # what the model will read (from the store)
    tst tokenizer train --config recipes/tiny.yaml --vocab-size 8192 [--out tok.json]
    tst data build-corpus --out data/bench100 [--mb 100] [--no-debian]
    tst data chunk-corpus data/bench100 --out data/bench100_chunks [--max-chars 2000] [--mb 30]

Imports nothing heavy at registration time.
"""

from __future__ import annotations

import argparse
import json
import sys

RECIPE_HELP = "recipe YAML (default: recipes/tiny.yaml, the recipe of tst train and tst demo)"


def _keys_epilog() -> str:
    from pipeline.cli.help import default_recipe, describe_keys

    return "Overrides are dotted config keys (the same as tst train's).\n\n" + describe_keys(default_recipe())


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="inspect the data stream, build a benchmark corpus")
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data.set_defaults(func=lambda a: (data.print_help(), 2)[1])

    epilog = _keys_epilog()
    raw = argparse.RawDescriptionHelpFormatter
    prep = dsub.add_parser("prepare", help="tokenize the corpus once into the token store (Ray Data job)",
                           epilog=epilog, formatter_class=raw)
    prep.add_argument("--config", help=RECIPE_HELP)
    prep.add_argument("--no-ray", action="store_true", help="prepare in this process instead of a Ray Data job "
                      "(same bytes)")
    prep.add_argument("--verify", action="store_true", help="then read every shard and check its sha256")
    prep.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.source=corpus/")
    prep.set_defaults(func=cmd_prepare)

    ins = dsub.add_parser("inspect", help="documents, tokens, windows per phase, skipped items, a sample window",
                          epilog=epilog, formatter_class=raw)
    ins.add_argument("--config", help=RECIPE_HELP)
    ins.add_argument("--no-ray", action="store_true", help="if the store is missing, prepare it in this process")
    ins.add_argument("--max-bags", type=int, default=48, help="bags of the sample window to print (default 48)")
    ins.add_argument("--json", action="store_true", help="print the numbers as JSON instead of text")
    ins.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.bag_size=6")
    ins.set_defaults(func=cmd_inspect)

    bc = dsub.add_parser("build-corpus", help="write a 100 MB+ JSONL corpus (builtins + Debian doc packages)")
    bc.add_argument("--out", required=True, help="output folder for corpus-NNNNN.jsonl shards")
    bc.add_argument("--mb", type=float, default=100.0, help="target size in MB of UTF-8 text (default 100)")
    bc.add_argument("--shard-mb", type=float, default=32.0, help="MB per shard (default 32)")
    bc.add_argument("--no-debian", action="store_true", help="only the builtin corpora (about 10 MB)")
    bc.add_argument("--seed", type=int, default=0, help="document shuffle seed; -1 keeps source order")
    bc.set_defaults(func=cmd_build_corpus)
    cc = dsub.add_parser("chunk-corpus", help="cut a JSONL corpus into shuffled pieces of at most 2,000 characters",
                         description="Split every document of a JSONL corpus folder (from build-corpus) into pieces "
                                     "of at most --max-chars characters (at line breaks where possible), shuffle "
                                     "them with a fixed seed and write them as JSONL shards: every batch is then a "
                                     "mixture even in the stream layout (the speedup study's data).")
    cc.add_argument("src", help="JSONL corpus folder (tst data build-corpus --out SRC)")
    cc.add_argument("--out", required=True, help="output folder for the pieces (a summary OUT.json is written beside)")
    cc.add_argument("--max-chars", type=int, default=2000, help="characters per piece at most (default 2000)")
    cc.add_argument("--mb", type=float, default=None, help="write at most this many MB of pieces")
    cc.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    cc.set_defaults(func=cmd_chunk_corpus)

    tok = subparsers.add_parser("tokenizer", help="train a byte-level BPE on the corpus")
    tsub = tok.add_subparsers(dest="tokenizer_command", metavar="TOKENIZER_COMMAND")
    tok.set_defaults(func=lambda a: (tok.print_help(), 2)[1])
    tr = tsub.add_parser("train", help="train a byte-level BPE on the train split of data.source",
                         epilog=epilog, formatter_class=raw)
    tr.add_argument("--config", help=RECIPE_HELP)
    tr.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (default: N of data.tokenizer=bpe:N, else 4096)")
    tr.add_argument("--out", default=None, help="tokenizer.json to write (default: the cache path that bpe:N uses)")
    tr.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.source=corpus/")
    tr.set_defaults(func=cmd_tokenizer_train)


# -- tst data inspect ----------------------------------------------------------------------------------------------
def mark_bags(tok, window, s: int, max_bags: int) -> str:
    """Decode a raw window bag by bag: `[bag 1][bag 2]...`, EOS shown as its token text."""
    ids = [int(x) for x in window]
    L = (len(ids) - s) // s if s > 1 else len(ids) - 1
    parts = []
    for j in range(min(L, max_bags)):
        bag = ids[j * s:(j + 1) * s]
        parts.append("[" + tok.decode(bag).replace("\n", "\\n") + "]")
    more = f" ... (+{L - max_bags} bags)" if L > max_bags else ""
    tail = ids[L * s:]
    return "".join(parts) + more + "  targets' tail: [" + tok.decode(tail).replace("\n", "\\n") + "]"


def _store_mode(cfg, tok, no_ray: bool) -> str:
    """"ray" (starting a local Ray, or joining $RAY_ADDRESS) only when the store must be prepared and --no-ray is off."""
    from pipeline.data import plan_store
    from pipeline.data.store import INDEX

    if no_ray:
        return "local"
    storage, _, _ = plan_store(cfg.data, tok, cfg.run.output_dir)
    if storage.exists(INDEX):
        return "local"
    from pipeline.ray_session import ensure_ray

    ensure_ray(cfg)
    return "ray"


def prepare(cfg, no_ray: bool = False, verify: bool = False) -> dict:
    """Build (or find) the token store of this config; returns what `tst data prepare` prints."""
    import time

    from pipeline.data import ensure_store
    from pipeline.data.reader import TokenStore
    from pipeline.data.tokenizer import load_tokenizer

    out = cfg.run.output_dir
    tok = load_tokenizer(cfg.data, out)
    mode = _store_mode(cfg, tok, no_ray)
    t0 = time.perf_counter()
    prep = ensure_store(cfg.data, tok, out, mode, wait="complete", console=True)
    store = TokenStore(prep.uri, cfg.data.s3_endpoint)
    idx = store.index
    checked = 0
    if verify:  # read every shard whole (local or remote) and check its sha256
        from pipeline.data.store import sha256

        for name in ("train", "val"):
            for sh in idx["streams"][name]["shards"]:
                if sha256(store.storage.read(sh["name"] + ".tok")) != sh["sha256"]:
                    raise SystemExit(f"error: shard {store.storage.uri(sh['name'] + '.tok')} fails its sha256 check; "
                                     f"delete {prep.uri} and prepare again")
                checked += 1
    return {"store": prep.uri, "id": prep.id, "prepared_now": prep.prepared_here, "mode": mode if prep.prepared_here else None,
            "seconds": round(time.perf_counter() - t0, 2), "dtype": idx["dtype"],
            "train_tokens": store.tokens("train"), "train_shards": len(idx["streams"]["train"]["shards"]),
            "val_tokens": store.tokens("val"), "documents": store.documents("train"),
            "val_documents": store.documents("val"), "stats": idx["stats"], "verified_shards": checked}


def cmd_prepare(args) -> int:
    from pipeline.cli.help import load_with_default_recipe

    cfg = load_with_default_recipe(args.config, args.overrides)
    info = prepare(cfg, args.no_ray, args.verify)
    sk = ", ".join(f"{k} {v}" for k, v in info["stats"]["skipped"].items())
    how = f"prepared now ({info['mode']}, {info['seconds']}s)" if info["prepared_now"] else "already prepared: reused"
    print(f"store         {info['store']} ({how})")
    print(f"train         {info['train_tokens']:,} tokens ({info['dtype']}) in {info['train_shards']} shard(s), "
          f"{info['documents']:,} documents")
    print(f"held out      {info['val_tokens']:,} tokens, {info['val_documents']:,} documents")
    print(f"skipped       {sk}; invalid UTF-8 {info['stats']['invalid_utf8']}; documents with NUL "
          f"{info['stats'].get('nul_documents', 0)}")
    if args.verify:
        print(f"verified      {info['verified_shards']} shard(s): sha256 OK")
    return 0


def inspect(cfg, max_bags: int = 48, no_ray: bool = False) -> dict:
    from pipeline.data import StreamPlan, build_source, list_files
    from pipeline.data.tokenizer import load_tokenizer

    out = cfg.run.output_dir
    tok = load_tokenizer(cfg.data, out)
    src = build_source(cfg, out, _store_mode(cfg, tok, no_ray), tokenizer=tok)
    plan: StreamPlan = src.plan
    s, L = cfg.data.bag_size, cfg.data.seq_len
    n = src.corpus_tokens
    st = src.stats
    files = list_files(cfg.data.source, cfg.data)
    sup_steps = plan.switch_step
    info = {
        "source": cfg.data.source, "files": len(files), "store": src.uri, "tokenizer": tok.path,
        "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
        "records": st["records"], "documents": st["documents"], "val_documents": st["val_documents"],
        "skipped": st["skipped"], "invalid_utf8_decoded_with_replacement": st["invalid_utf8"],
        "nul_documents": st.get("nul_documents", 0),
        "train_tokens": n, "val_tokens": src.store.tokens("val"),
        "windows_per_epoch": {
            "superposition": {"bag_size": s, "window_tokens": s * L + s, "windows": (n - s) // (s * L) if n > s else 0},
            "recovery": {"window_tokens": L + 1, "windows": (n - 1) // L},
        },
        "run": {"steps": plan.total_steps, "switch_step": sup_steps, "global_batch": plan.global_batch_size,
                "tokens_read": plan.tokens_needed(), "epochs": round(plan.tokens_needed() / n, 3),
                "val_windows": int(src.val_windows()[0].shape[0] if isinstance(src.val_windows(), tuple) else src.val_windows().shape[0])},
        "doc_boundary": cfg.data.doc_boundary,
        "batch": src.layout_summary(),
    }
    w0 = src.step_windows(0, 0, 1)
    w0 = w0[0] if isinstance(w0, tuple) else w0
    s0 = plan.bag_size_at(0)
    info["sample"] = {"step": 0, "phase": "superposition" if s0 > 1 else "recovery", "bag_size": s0,
                      "text": mark_bags(tok, w0[0].tolist(), s0, max_bags)}
    if sup_steps < plan.total_steps and s0 > 1:
        wr = src.step_windows(sup_steps, 0, 1)
        wr = wr[0] if isinstance(wr, tuple) else wr
        info["sample_recovery"] = {"step": sup_steps, "text": mark_bags(tok, wr[0].tolist(), 1, max_bags)}
    return info


def cmd_inspect(args) -> int:
    from pipeline.cli.help import load_with_default_recipe

    cfg = load_with_default_recipe(args.config, args.overrides)
    info = inspect(cfg, args.max_bags, args.no_ray)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    w = info["windows_per_epoch"]
    r = info["run"]
    sk = ", ".join(f"{k} {v}" for k, v in info["skipped"].items())
    print(f"source        {info['source']} ({info['files']} file(s))")
    print(f"store         {info['store']}")
    print(f"tokenizer     {info['tokenizer']} (vocab {info['vocab_size']}, EOS id {info['eos_id']})")
    print(f"documents     {info['documents']} train, {info['val_documents']} held out ({info['records']} records read)")
    print(f"skipped       {sk}; invalid UTF-8 decoded with replacement: {info['invalid_utf8_decoded_with_replacement']}; "
          f"documents with NUL: {info['nul_documents']}")
    print(f"tokens        {info['train_tokens']:,} train, {info['val_tokens']:,} held out")
    print(f"windows/epoch superposition (s={w['superposition']['bag_size']}, {w['superposition']['window_tokens']} tokens): "
          f"{w['superposition']['windows']:,}; recovery ({w['recovery']['window_tokens']} tokens): {w['recovery']['windows']:,}")
    print(f"run           {r['steps']} steps (superposition 0..{r['switch_step'] - 1}), batch {r['global_batch']}, "
          f"reads {r['tokens_read']:,} tokens = {r['epochs']} epoch(s); {r['val_windows']} held-out windows; "
          f"doc boundary: {info['doc_boundary']}")
    b = info["batch"]
    how = "lanes across the epoch" if b["layout"] == "lanes" else "consecutive windows in stream order"
    order = (f"shuffled in chunks of {b['shuffle_chunk_tokens']:,} tokens, seed {b['seed']}" if b["shuffle"]
             else "file order")
    print(f"batch         {how}; {order}")
    for name, c in (b.get("sources") or {}).items():
        print(f"  source {name}: weight {c['weight']:.3g}, {c['rows']} row(s) of every step, lanes of "
              f"{c['lane_tokens']:,} tokens, {c['epochs_run']:.2f} epoch(s) over the run")
    sm = info["sample"]
    print(f"\nsample window (step {sm['step']}, {sm['phase']}, each [..] is one bag of {sm['bag_size']} token(s)):")
    print(sm["text"])
    if "sample_recovery" in info:
        print(f"\nsample window (step {info['sample_recovery']['step']}, recovery, one token per [..]):")
        print(info["sample_recovery"]["text"])
    return 0


# -- tst tokenizer train ---------------------------------------------------------------------------------------------
def cmd_tokenizer_train(args) -> int:
    from pipeline.cli.help import load_with_default_recipe
    from pipeline.data.tokenizer import bpe_cache_path, parse_tokenizer_spec, train_corpus_bpe

    cfg = load_with_default_recipe(args.config, args.overrides)
    kind, n = parse_tokenizer_spec(cfg.data.tokenizer)
    vocab = args.vocab_size or (n if kind == "bpe" else 4096)
    out = args.out or bpe_cache_path(cfg.data, cfg.run.output_dir, vocab)
    info = train_corpus_bpe(cfg.data, vocab, out)
    print(f"trained byte-level BPE (vocab {vocab}) on {info['documents']} documents ({info['chars']:,} chars) "
          f"in {info['seconds']}s -> {out}")
    if not args.out:
        print(f"use it with data.tokenizer=bpe:{vocab} (cached) or data.tokenizer={out}")
    return 0


# -- tst data build-corpus -----------------------------------------------------------------------------------------
def cmd_build_corpus(args) -> int:
    import logging

    from pipeline.data.corpus import build_corpus

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = build_corpus(args.out, target_mb=args.mb, shard_mb=args.shard_mb, debian=not args.no_debian,
                           shuffle_seed=None if args.seed < 0 else args.seed)
    print(f"wrote {summary['mb']} MB in {summary['shards']} shard(s) to {summary['out']} "
          f"(use data.source={summary['out']})", file=sys.stdout)
    return 0


# -- tst data chunk-corpus -----------------------------------------------------------------------------------------
def cmd_chunk_corpus(args) -> int:
    from pipeline.data.corpus import chunk_corpus

    info = chunk_corpus(args.src, args.out, args.max_chars, args.mb, args.seed)
    print(f"wrote {info['pieces_written']:,} of {info['pieces_total']:,} pieces ({info['mb']} MB) in {info['shards']} "
          f"shard(s) to {info['dst']} (use data.source={info['dst']})", file=sys.stdout)
    return 0
