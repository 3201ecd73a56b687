"""What a user sees (issue 18): --help that explains every key with the recipe's values, every command on the same
recipe, MLflow runs that open as a training experiment with names and params that tell runs apart, and a quiet
console for a successful `tst train` on a local Ray.

Real pieces: the `tst` parser, the bundled corpus and a BPE trained on it, MLflow on SQLite, a real `tst train` in a
subprocess that starts its own Ray while the test session's Ray is also up, and a local Ray started as `tst` starts
it, whose processes are read from /proc.
"""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.intermediate_size=128", "data.max_documents=300", "data.tokenizer=bpe:512", "data.seq_len=32",
        "data.val_windows=8", "train.steps=6", "train.global_batch_size=4", "train.warmup_steps=2",
        "train.log_every=2", "train.eval_every=3", "train.checkpoint_every=3"]


def user_shell_env() -> dict:
    """This process's environment without the test session's Ray, MLflow and Tune settings: a user's shell."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "TUNE_"))}


def help_text(*argv) -> None:
    """Print `tst ARGV --help` (captured by capsys)."""
    from pipeline.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])


def test_train_help_explains_every_key_with_the_recipe_values(capsys):
    from pipeline.config import Config
    from pipeline.cli.help import key_docs

    help_text("train")
    text = capsys.readouterr().out
    keys = list(Config().flatten())
    docs = key_docs()
    assert [k for k in keys if not docs.get(k)] == []  # one line of meaning for every key, from config.py
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith("  ") and ln.split()[0] in keys}
    assert set(lines) == set(keys)
    # the recipe tst train uses (recipes/tiny.yaml: 300 steps, set by the recipe), not the dataclass's 400
    assert re.search(r"train\.steps\s+300\*\s+T: optimizer steps", lines["train.steps"]), lines["train.steps"]
    assert re.search(r"train\.lr\s+0\.003\s+AdamW peak", lines["train.lr"])
    for sub in (["tune"], ["data", "inspect"], ["data", "prepare"], ["tokenizer", "train"]):
        help_text(*sub)
        assert lines["train.steps"] in capsys.readouterr().out, sub


def test_data_commands_default_to_the_train_recipe(monkeypatch, tmp_path):
    """`tst tokenizer train` and `tst data inspect` describe the run `tst train` makes: same config, same
    tokenizer cache path (a second tokenizer was cached from the dataclass defaults before)."""
    import pipeline.cli.data as data_cli
    import pipeline.runner as runner
    from pipeline.cli import main
    from pipeline.data.tokenizer import bpe_cache_path

    seen = {}
    monkeypatch.setattr("pipeline.data.tokenizer.train_corpus_bpe",
                        lambda d, vocab, out: seen.update(data=d, out=out) or {"documents": 0, "chars": 0,
                                                                               "seconds": 0})

    def inspect(cfg, *args):
        seen["cfg"] = cfg
        raise RuntimeError("stop")

    monkeypatch.setattr(data_cli, "inspect", inspect)
    monkeypatch.setattr(runner, "run_training", lambda cfg, **kw: seen.update(train=cfg) or {})
    out = f"run.output_dir={tmp_path}"
    assert main(["tokenizer", "train", out]) == 0
    with pytest.raises(RuntimeError, match="stop"):
        main(["data", "inspect", out])
    assert main(["train", out]) == 0
    train = seen["train"]
    assert seen["cfg"].to_dict() == train.to_dict()
    assert seen["out"] == bpe_cache_path(train.data, train.run.output_dir, 4096)
    assert seen["data"] == train.data and train.train.steps == 300


def test_mlflow_opens_on_runs_that_tell_apart(tmp_path, capsys):
    from mlflow import MlflowClient

    from pipeline.cli import main
    from pipeline.report.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    out = str(tmp_path)
    assert main(["train", "--no-ray", *TINY, "data.bag_size=2", "train.switch_fraction=0.5",
                 f"run.output_dir={out}"]) == 0
    text = capsys.readouterr()
    assert "Creating initial MLflow database tables" not in text.out + text.err
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("tst")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name.startswith("s2-r0.5-T6-tiny-")
    p = run.data.params
    assert (p["s"], p["r"], p["T"]) == ("2", "0.5", "6")
    # model sizes as the run built them: the tokenizer's vocabulary and the preset's values, never None
    assert p["model.vocab_size"] == "512" and p["model.hidden_size"] == "64" and p["model.rope_theta"] == "10000.0"
    assert not [k for k, v in p.items() if k.startswith("model.") and v == "None"]
    # an experiment created before the tag existed is marked when a run next uses it
    client.delete_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG)
    assert main(["train", "--no-ray", *TINY, f"run.output_dir={out}"]) == 0
    assert client.get_experiment(exp.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    names = [r.info.run_name for r in client.search_runs([exp.experiment_id])]
    assert any(n.startswith("s1-T6-tiny-") for n in names)


# A line a healthy run must not print: tracebacks, error/warning levels of Python logging and of Ray's C++ core
# ("[2026-12-02 01:42:34,306 E 21757 21757] core_worker.cc"), and the notices issue 18 traced to their causes.
ALARMING = re.compile(r"Traceback|\b(ERROR|WARNING|CRITICAL)\b|\d\d:\d\d:\d\d,\d+ [EWF] \d+ \d+\]|Warning:|"
                      r"Token authentication|Progress bars disabled|tensorboard|Creating initial MLflow")


def test_successful_ray_train_console_is_quiet(tmp_path, ray_session):
    """A short `tst train` on its own local Ray, with the test session's Ray also running on the machine (the
    condition under which Ray Train's placement-group cleaner printed a traceback; a local Ray now starts no
    cleaner, pipeline.ray_internals.lean_local_trainer), prints our lines only."""
    env = user_shell_env()
    tst = os.path.join(os.path.dirname(sys.executable), "tst")
    proc = subprocess.run([tst, "train", *TINY, "scaling.cpus_per_worker=0.5", f"run.output_dir={tmp_path}"],
                          env=env, capture_output=True, text=True, timeout=1200)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    bad = [ln for ln in console.splitlines() if ALARMING.search(ln)]
    assert not bad, "\n".join(bad[:40])
    assert "[tst] done: s1-T6-tiny-" in console
    assert len(re.findall(r"step 6/6 ", console)) == 1  # rank 0's last progress line, once
    (summary,) = glob.glob(os.path.join(tmp_path, "runs", "s1-T6-tiny-*", "summary.json"))
    with open(summary) as f:  # rank 0's machine came through Ray Train's report (its numerics depend on it)
        machine = json.load(f)["machine"]
    assert machine["cpu_capability"] and len(machine["cpu_flags_sha256"]) == 12


LOCAL_RAY_PROBE = """
import json, os, ray
from pipeline.ray_session import start_local_ray
start_local_ray(4)
@ray.remote(num_cpus=0, runtime_env={"env_vars": {"TST_PROBE": "yes"}})  # as Ray Train starts its actors
class Probe:
    def env(self):
        return os.environ.get("TST_PROBE")
works = [ray.get(Probe.remote().env.remote()), ray.get(ray.remote(lambda: 2).remote())]
session = ray._private.worker._global_node.get_session_dir_path()  # no public API names it
logs = sorted(os.listdir(os.path.join(session, "logs")))
procs = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\\0", b" ").decode()
    except OSError:
        continue
    if os.path.basename(session) in cmd:
        procs.append(cmd)
print(json.dumps({"works": works, "logs": logs, "procs": procs}))
"""


def test_local_ray_starts_only_what_a_run_needs():
    """`start_local_ray` (what `tst` starts when $RAY_ADDRESS is unset) runs no autoscaler monitor, no dashboard API
    server and prestarts no idle workers, and still runs a task and an actor with its own runtime env (Ray Train's
    controller and workers are such actors). Ray's head processes are told apart by their files in the session's
    logs folder (one `<process>.log`/`.out` each; a prestarted worker's log names no job, `-ffffffff-`) and by
    their command lines."""
    import json

    env = user_shell_env()
    proc = subprocess.run([sys.executable, "-c", LOCAL_RAY_PROBE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["works"] == ["yes", 2]
    assert "raylet.out" in seen["logs"] and "log_monitor.log" in seen["logs"], seen["logs"]  # the Ray it inspects
    assert not [f for f in seen["logs"] if f.startswith(("monitor.", "dashboard."))], seen["logs"]
    assert not [f for f in seen["logs"] if f.startswith("worker-") and "-ffffffff-" in f], seen["logs"]
    assert any("/raylet" in c for c in seen["procs"]), seen["procs"]
    head_only = ("/autoscaler/_private/monitor.py", "/dashboard/dashboard.py")  # not log_monitor.py, dashboard/agent.py
    assert not [c for c in seen["procs"] if any(p in c for p in head_only)], seen["procs"]


def test_driver_preload_imports_no_ray():
    """`tst train` imports pipeline.runner.DRIVER_PRELOAD in a thread while its main thread runs `ray.init`; two
    threads importing Ray's packages at once can deadlock on Python's import locks, so the preload must not."""
    code = ("import importlib, sys\nfrom pipeline.runner import DRIVER_PRELOAD\nbefore = set(sys.modules)\n"
            "for m in DRIVER_PRELOAD: importlib.import_module(m)\n"
            "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own print of a list of names
    assert "torch" in loaded, loaded  # what the preload is for
    assert not set(loaded) & {"ray", "mlflow", "pandas", "pyarrow"}, loaded


def test_export_files_are_readable_like_any_new_file(tmp_path):
    """safetensors writes 0600; an export gets the mode of every other new file (0644 under umask 022)."""
    import stat

    from pipeline.cli import main

    out = str(tmp_path / "out")
    assert main(["train", "--no-ray", *TINY, "run.tracking=false", f"run.output_dir={out}", "--name", "x"]) == 0
    assert main(["export", os.path.join(out, "runs", "x"), str(tmp_path / "exp")]) == 0
    mask = os.umask(0)
    os.umask(mask)
    for name in os.listdir(tmp_path / "exp"):
        mode = stat.S_IMODE(os.stat(tmp_path / "exp" / name).st_mode)
        assert mode == 0o666 & ~mask, (name, oct(mode))
