"""Every config key with its value in the recipe a command uses and one line of meaning, for `--help`.

One source of truth: the meaning of a key is the comment on its line in `pipeline/config.py` (or, for a key
without one, the comment block right above it). `tests/test_cli.py` checks that every key has one. Standard
library only (yaml when a recipe is read), so `tst --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

from pipeline.config import Config, ConfigError, load_config

_SECTIONS = {"ModelConfig": "model", "DataConfig": "data", "TrainConfig": "train", "ScalingConfig": "scaling",
             "RunConfig": "run"}
_FIELD = re.compile(r"^    (\w+): [^=#]+?(?:\s*=.*?)?(?:  # (.*))?$")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # pipeline/cli/help.py -> repo
DEFAULT_RECIPE = os.path.join(REPO_ROOT, "recipes", "tiny.yaml")


def default_recipe() -> Optional[str]:
    """The recipe every command uses without --config (recipes/tiny.yaml, when the checkout has it)."""
    return DEFAULT_RECIPE if os.path.exists(DEFAULT_RECIPE) else None


def load_with_default_recipe(path: Optional[str], overrides: Optional[list] = None) -> Config:
    """`load_config` of --config, or of the default recipe when none is given: every command describes the same
    run as `tst train` and `tst demo` (and finds the same tokenizer and token store)."""
    return load_config(path or default_recipe(), overrides)


def key_docs() -> dict[str, str]:
    """Dotted key -> its meaning, read from the comments of pipeline/config.py."""
    import pipeline.config as config_module

    with open(config_module.__file__) as f:
        lines = f.read().splitlines()
    docs: dict[str, str] = {}
    section, block = None, []
    for line in lines:
        m = re.match(r"^class (\w+)", line)
        if m:
            section, block = _SECTIONS.get(m.group(1)), []
            continue
        if section is None:
            continue
        if line.startswith("    #"):
            block.append(line.strip().lstrip("#").strip())
            continue
        m = _FIELD.match(line)
        if m:
            text = (m.group(2) or "").strip() or _first_sentence(" ".join(block))
            if text:
                docs[f"{section}.{m.group(1)}"] = text
        block = []
    return docs


def _first_sentence(text: str, limit: int = 120) -> str:
    """A comment block's first sentence, cut at a clause boundary when it is longer than `limit`."""
    m = re.search(r"\.(\s|$)", text)
    text = text[:m.start() + 1] if m else text
    if len(text) > limit:
        cut = max(text.rfind("; ", 0, limit), text.rfind(", ", 0, limit))
        text = text[:cut] + " ..." if cut > 0 else text
    return text


def _fmt(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{}" if not v else "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def describe_keys(recipe: Optional[str] = None) -> str:
    """Every dotted key = its value under `recipe` (marked * where the recipe sets it), then its meaning."""
    base = Config().flatten()
    try:
        values = load_config(recipe).flatten() if recipe else base
    except ConfigError as e:  # a broken recipe must not break --help
        values, recipe = base, f"{recipe} (unreadable: {e})"
    docs = key_docs()
    width = max(len(k) for k in values) + 1
    vwidth = min(16, max(len(_fmt(v)) for v in values.values())) + 2
    where = os.path.relpath(recipe) if recipe and os.path.exists(recipe) else recipe
    head = (f"Every key, with its value in {where} (* = set by that recipe, else the built-in default) and what it "
            f"means; a --config recipe replaces these values, key=value overrides them:" if recipe else
            "Every key, with its built-in default and what it means:")
    out = [head]
    section = None
    for key, value in values.items():
        sec = key.split(".")[0]
        if sec != section:
            section = sec
            out.append(f"  [{sec}]")
        mark = "*" if recipe and value != base.get(key) else " "
        val = _fmt(value) + mark
        out.append(f"  {key:<{width}} {val:<{vwidth}} {docs.get(key, '')}".rstrip())
    return "\n".join(out)


def config_fields() -> list[str]:
    """Every dotted key of the config tree (for tests)."""
    keys = []
    for f in dataclasses.fields(Config):
        keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(f.type if isinstance(f.type, type)
                                                                  else type(getattr(Config(), f.name)))]
    return keys
