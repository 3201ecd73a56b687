"""Faults and bad input (issue 15): fail fast and once on what a retry would repeat, recover by itself from what
it would not, and leave nothing behind (no RUNNING MLflow run, no empty run folder, no staging folder).

Real pieces: the bundled corpus and a BPE trained with HF `tokenizers`, DCP checkpoints, MLflow on SQLite, Ray
Train with 2 gloo workers on the session's local Ray.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.errors import DataError

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import BASE, _copy_cache, make_cfg, run_local  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shared_out(tmp_path_factory):
    return str(tmp_path_factory.mktemp("out"))


def _mlflow_runs(uri: str, experiment: str = "tst"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


# -- configuration: refused in about a second, before MLflow, Ray or data ------------------------------------------
@pytest.mark.parametrize("override,key", [
    ("train.lr=-1", "train.lr"), ("train.lr=nan", "train.lr"), ("train.weight_decay=-0.1", "train.weight_decay"),
    ("train.beta2=1.0", "train.beta2"), ("data.val_fraction=1.5", "data.val_fraction"),
    ("data.batch_layout=rows", "data.batch_layout"),
])
def test_impossible_values_fail_in_a_second_before_anything_starts(tmp_path, override, key):
    from pipeline.config import Config, apply_overrides
    from pipeline.runner import run_training

    cfg = apply_overrides(Config(), BASE + [f"run.output_dir={tmp_path}", "run.tracking=true", override])
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_training(cfg, use_ray=True, name="bad", console=False)
    assert time.perf_counter() - t0 < 5
    assert os.listdir(tmp_path) == []  # no run folder, no MLflow store, no Ray


@pytest.mark.parametrize("name", ["../../x", "a'b", "a b", ".hidden", "x/y"])
def test_run_names_that_escape_the_folder_or_break_the_mlflow_filter_are_refused(tmp_path, name):
    from pipeline.config import Config, apply_overrides
    from pipeline.runner import run_training

    cfg = apply_overrides(Config(), BASE + [f"run.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="run name"):
        run_training(cfg, use_ray=False, name=name, console=False)
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "runs")


def test_secrets_are_masked_in_mlflow_params_but_kept_for_resume(shared_out, tmp_path):
    from pipeline.runner import run_training

    _copy_cache(shared_out, str(tmp_path))
    endpoint = "http://user:s3cr3t@127.0.0.1:1"  # not used by a builtin corpus: only logged
    cfg = make_cfg(shared_out, f"run.output_dir={tmp_path}", "train.steps=2", "train.eval_every=2",
                   "run.tracking=true", f"data.s3_endpoint={endpoint}")
    s = run_training(cfg, use_ray=False, name="secret", console=False)
    (run,) = _mlflow_runs(s["tracking_uri"])
    assert run.data.params["data.s3_endpoint"] == "http://user:***@127.0.0.1:1"
    assert "s3cr3t" not in json.dumps(run.data.params)
    with open(os.path.join(s["run_dir"], "config.yaml")) as f:
        assert endpoint in f.read()  # the run's own copy keeps it


# -- what only the data can tell: right after prepare, before training ----------------------------------------------
def test_a_corpus_with_no_held_out_window_fails_after_prepare_and_leaves_nothing(tmp_path):
    from pipeline.config import Config, apply_overrides
    from pipeline.runner import run_training

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with open(corpus / "docs.jsonl", "w") as f:  # 49 short documents: 1% held out is nothing
        for i in range(49):
            f.write(json.dumps({"text": f"document {i}: " + "a few words of text. " * 20}) + "\n")
    out = tmp_path / "out"
    cfg = apply_overrides(Config(), BASE + [f"run.output_dir={out}", f"data.source={corpus}", "data.tokenizer=gpt2",
                                            "run.tracking=true", "data.max_documents=null"])
    with pytest.raises(DataError, match="no held-out window.*data.val_fraction"):
        run_training(cfg, use_ray=False, name="small", console=False)
    assert not os.path.exists(out / "runs" / "small")  # no run folder left behind
    runs = _mlflow_runs(f"sqlite:///{out}/mlflow.db")
    assert [r.info.status for r in runs] == ["FAILED"]  # not RUNNING


# -- a finished run, resumed ------------------------------------------------------------------------------------------
def test_resume_of_a_finished_run_changes_neither_its_summary_nor_its_mlflow_status(shared_out, tmp_path):
    from pipeline.runner import run_training

    _copy_cache(shared_out, str(tmp_path))
    cfg = make_cfg(shared_out, f"run.output_dir={tmp_path}", "train.steps=4", "run.tracking=true")
    first = run_training(cfg, use_ray=False, name="done", console=False)
    path = os.path.join(first["run_dir"], "summary.json")
    before = open(path).read()
    again = run_training(cfg, use_ray=False, name="done", console=False)
    assert open(path).read() == before
    assert again["final_val_loss"] == first["final_val_loss"] is not None
    (run,) = _mlflow_runs(first["tracking_uri"])
    assert run.info.status == "FINISHED"


# -- checkpoints: verified, walked back, published atomically ------------------------------------------------------
def _shard(ckpt: str) -> str:
    return os.path.join(ckpt, "__0_0.distcp")


def test_verify_finds_truncated_missing_and_altered_files(shared_out, tmp_path):
    from pipeline.train.checkpoint import LocalCheckpointManager, verify

    run_local(make_cfg(shared_out, "train.steps=4"), str(tmp_path))
    (ckpt,) = LocalCheckpointManager(str(tmp_path)).list()
    assert verify(ckpt, checksums=True) is None
    broken = str(tmp_path / "broken")

    def fresh():
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(ckpt, broken)
        return broken

    size = os.path.getsize(_shard(ckpt))
    with open(_shard(fresh()), "r+b") as f:
        f.truncate(size // 2)
    assert "truncated" in verify(broken)
    os.remove(os.path.join(fresh(), "manifest-0.json"))
    os.remove(os.path.join(broken, "rng-0.pt"))
    assert verify(broken) is None  # a checkpoint from before manifests: the DCP metadata check alone
    meta = json.load(open(os.path.join(fresh(), "meta.json")))
    meta["world_size"] = 2
    json.dump(meta, open(os.path.join(broken, "meta.json"), "w"))
    assert verify(broken) == "1 of 2 ranks' manifests"
    with open(os.path.join(fresh(), "tokenizer.json"), "r+b") as f:  # same size, other bytes
        f.seek(0)
        f.write(b"X")
    assert verify(broken) is None and "sha256" in verify(broken, checksums=True)


TWO_RANK_WRITER = """
import os, sys, torch, torch.distributed as dist
rank, out, store = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
torch.set_num_threads(1)
from pipeline.config import Config, apply_overrides
from pipeline.train.checkpoint import save_checkpoint
from pipeline.train.loop import build_model, build_optimizer
from pipeline.train.parallel import parallelize
cfg = apply_overrides(Config(), ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
                                 "model.num_kv_heads=2", "model.intermediate_size=128"])
model, _ = build_model(cfg, 300, torch.device("cpu"))
parallelize(model, distributed=True)  # FSDP2: each rank holds half of every parameter and of its Adam state
opt = build_optimizer(cfg, model)
g = torch.Generator().manual_seed(rank)
model(torch.randint(0, 300, (1, 16), generator=g), torch.randint(0, 300, (1, 16), generator=g)).backward()
opt.step()
# each rank into its own staging folder, as under Ray Train (which merges them)
save_checkpoint(os.path.join(out, f"rank{rank}"), model, opt, {"world_size": 2, "step": 1}, rank)
dist.barrier()
dist.destroy_process_group()
"""


def test_verify_finds_a_missing_or_truncated_shard_of_the_other_rank(tmp_path):
    """A real two-rank FSDP2 checkpoint (two gloo processes, merged as Ray Train merges its ranks' folders): rank 1's
    shard missing, truncated or altered, its manifest or RNG file missing, are each found; the one-rank test above
    only ever sees rank 0's files."""
    from torch.distributed.checkpoint import FileSystemReader

    from pipeline.train.checkpoint import verify

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", TWO_RANK_WRITER, str(r), str(tmp_path), str(tmp_path / "pg")],
                              cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    ckpt = str(tmp_path / "ckpt")
    for r in (0, 1):
        shutil.copytree(tmp_path / f"rank{r}", ckpt, dirs_exist_ok=True)
    shards = {i.relative_path for i in FileSystemReader(ckpt).read_metadata().storage_data.values()}
    assert shards == {"__0_0.distcp", "__1_0.distcp"}  # the DCP metadata needs both ranks' shards
    assert verify(ckpt, checksums=True) is None
    other = "__1_0.distcp"
    size = os.path.getsize(os.path.join(ckpt, other))
    broken = str(tmp_path / "broken")

    def fresh():
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(ckpt, broken)
        return broken

    os.remove(os.path.join(fresh(), other))
    assert verify(broken) == f"shard {other} missing"
    with open(os.path.join(fresh(), other), "r+b") as f:
        f.truncate(size - 1)  # one byte short: DCP's last record of rank 1 ends at its file's end
    assert verify(broken) == f"shard {other} truncated ({size - 1} of {size} bytes)"
    os.remove(os.path.join(fresh(), "manifest-1.json"))
    assert verify(broken) == "1 of 2 ranks' manifests"
    os.remove(os.path.join(fresh(), "rng-1.pt"))
    assert verify(broken) == "rng-1.pt missing"
    with open(os.path.join(fresh(), other), "r+b") as f:  # same size, other bytes
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    assert verify(broken) is None and verify(broken, checksums=True) == f"{other} does not match its sha256"


def test_a_truncated_newest_checkpoint_is_skipped_with_one_warning_and_the_run_recovers_exactly(
        shared_out, tmp_path, capsys):
    from pipeline.train.checkpoint import LocalCheckpointManager

    cfg = make_cfg(shared_out)  # T = 10, checkpoints at 4, 8, 10
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    _, ref, _ = run_local(cfg, ref_dir)
    run_local(cfg, run_dir)
    mgr = LocalCheckpointManager(run_dir)
    newest = mgr.all_steps()[-1]
    with open(_shard(newest), "r+b") as f:
        f.truncate(100)
    capsys.readouterr()
    summary, redone, _ = run_local(cfg, run_dir)  # resumes: step_10 is broken, step_8 is not
    out = capsys.readouterr().out
    assert out.count("warning: skipped incomplete checkpoint") == 1 and "step_00000010 (shard" in out
    assert [r["step"] for r in redone if "train_loss" in r] == [9, 10]
    assert {r["step"]: r["train_loss"] for r in redone if "train_loss" in r} == \
        {r["step"]: r["train_loss"] for r in ref if r["step"] in (9, 10) and "train_loss" in r}
    assert os.path.basename(mgr.latest()) == "step_00000010"  # re-published over the broken one
    assert not [n for n in os.listdir(mgr.root) if n.startswith((".old-", ".tmp-"))]


def test_the_ray_path_walks_back_through_ray_checkpoints_fetching_only_what_it_inspects(shared_out, tmp_path):
    """RayReporter.latest_checkpoint's walk: `newest_verified` over Ray `Checkpoint`s, opened with their own
    `as_directory` (a download on remote storage) newest first, stopping at the first that verifies."""
    import contextlib

    from ray.train import Checkpoint

    from pipeline.train.checkpoint import LocalCheckpointManager, newest_verified

    run_local(make_cfg(shared_out), str(tmp_path))  # checkpoints at 4, 8, 10
    paths = LocalCheckpointManager(str(tmp_path), keep=5).all_steps()
    with open(_shard(paths[-1]), "r+b") as f:
        f.truncate(100)
    opened, said = [], []

    @contextlib.contextmanager
    def as_directory(c):
        opened.append(os.path.basename(c.path))
        with c.as_directory() as d:
            yield d

    cands = [Checkpoint.from_directory(p) for p in paths]
    with newest_verified(cands, as_directory=as_directory, name=lambda c: os.path.basename(c.path),
                         say=said.append) as path:
        assert os.path.basename(path) == "step_00000008"
    assert opened == ["step_00000010", "step_00000008"]  # step 4 never fetched
    assert len(said) == 1 and "step_00000010 (shard" in said[0]


def test_rng_state_is_saved_per_rank_and_restored_on_resume(shared_out, tmp_path):
    from pipeline.train.checkpoint import LocalCheckpointManager

    cfg = make_cfg(shared_out, "train.steps=4")
    run_local(cfg, str(tmp_path))
    ckpt = LocalCheckpointManager(str(tmp_path)).latest()
    saved = torch.load(os.path.join(ckpt, "rng-0.pt"), weights_only=True)
    torch.manual_seed(12345)  # something else entirely
    run_local(make_cfg(shared_out, "train.steps=4"), str(tmp_path))  # resumes at step 4 = T
    assert torch.equal(torch.get_rng_state(), saved["torch"])


def test_staging_folders_of_dead_writers_are_swept(tmp_path):
    from pipeline.train.checkpoint import sweep_staging

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"step00000004-rank1-pid{dead.pid}-abc").mkdir()
    (tmp_path / f"step00000004-rank0-pid{os.getpid()}-def").mkdir()
    assert sweep_staging(str(tmp_path)) == 1
    assert os.listdir(tmp_path) == [f"step00000004-rank0-pid{os.getpid()}-def"]


# -- Ray: a deterministic worker error ends the run once, with one line, although retries are left: the first run of
# tests/test_trainer.py::test_ray_runs_read_the_plain_loops_windows_and_match_it_across_a_failure_and_a_resize

# -- resume: one decision over everything that determines the stream --------------------------------------------------
@pytest.mark.parametrize("change,what", [
    ("data.shuffle_seed=7", "shuffle_seed"), ("data.shuffle=false", "shuffle"),
    ("data.shuffle_chunk_tokens=4096", "shuffle_chunk_tokens"), ("data.batch_layout=stream", "layout"),
    ("data.val_fraction=0.05", "stores"), ("data.max_documents=250", "stores"),
])
def test_resume_refuses_any_change_to_what_a_step_reads(shared_out, tmp_path, change, what):
    cfg = make_cfg(shared_out, "train.steps=4")
    run_local(cfg, str(tmp_path))
    with pytest.raises(ConfigError, match=rf"data stream differs .*{what}: saved"):
        run_local(make_cfg(shared_out, "train.steps=4", change), str(tmp_path))
    run_local(make_cfg(shared_out, "train.steps=4", change, "run.allow_resume_changes=true"), str(tmp_path))


def test_a_checkpoint_of_a_newer_format_is_refused(shared_out, tmp_path):
    from pipeline.train.checkpoint import CHECKPOINT_FORMAT, LocalCheckpointManager, _file_record

    cfg = make_cfg(shared_out, "train.steps=4")
    run_local(cfg, str(tmp_path))
    path = os.path.join(LocalCheckpointManager(str(tmp_path)).latest(), "meta.json")
    meta = json.load(open(path))
    assert meta["format_version"] == CHECKPOINT_FORMAT
    meta["format_version"] = CHECKPOINT_FORMAT + 1
    with open(path, "w") as f:
        json.dump(meta, f)
    man_path = os.path.join(os.path.dirname(path), "manifest-0.json")  # as a newer tst would have written it
    man = json.load(open(man_path))
    man["files"]["meta.json"] = _file_record(path)
    with open(man_path, "w") as f:
        json.dump(man, f)
    with pytest.raises(ConfigError, match="has format 3, this tst reads up to 2"):
        run_local(cfg, str(tmp_path))


# -- tracking never stalls training ---------------------------------------------------------------------------------
def test_a_hung_tracking_server_never_blocks_logging_and_closing_is_bounded(tmp_path, monkeypatch):
    """A server that accepts connections and never answers (the worst case: no error to react to)."""
    import socket
    import threading
    import warnings

    from pipeline.report.tracking import MlflowTracker

    for k in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(k, raising=False)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held = []
    threading.Thread(target=lambda: [held.append(srv.accept()) for _ in range(64)], daemon=True).start()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # one request: 1 s, not MLflow's 120 s default
    tracker = MlflowTracker(f"http://127.0.0.1:{srv.getsockname()[1]}", "", "", run_id="0" * 32)
    t0 = time.perf_counter()
    for step in range(200):
        tracker.log_metrics({"train_loss": 1.0 / (step + 1)}, step=step)
    assert time.perf_counter() - t0 < 0.5  # 200 records queued while the server hangs
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker.end("FINISHED", timeout_s=3.0)
    assert time.perf_counter() - t0 < 30
    assert len(tracker.pending) == 200  # nothing lost: still queued (and in metrics.jsonl for backfill)
    srv.close()


# -- the elastic batch rule: any worker count, uneven shards --------------------------------------------------------
def test_validate_accepts_any_worker_count_that_gives_every_rank_its_micro_batches():
    from pipeline.config import Config, apply_overrides, validate

    ok = apply_overrides(Config(), ["train.global_batch_size=512", "scaling.num_workers=512", "scaling.min_workers=32"])
    validate(ok)  # was: 512 divisible by every count in 32..512
    validate(apply_overrides(Config(), ["train.global_batch_size=10", "scaling.num_workers=3",
                                        "train.micro_batch_size=2"]))  # shares 3,3,4: 2 micro-batches each
    with pytest.raises(ConfigError, match="smaller than 5 workers"):
        validate(apply_overrides(Config(), ["train.global_batch_size=4", "scaling.num_workers=5"]))
    with pytest.raises(ConfigError, match="empty micro-batch"):  # shares 2 and 3 with micro 1: 3 vs 2 micro-batches
        validate(apply_overrides(Config(), ["train.global_batch_size=5", "scaling.num_workers=2",
                                            "train.micro_batch_size=1"]))


def test_uneven_shards_partition_the_global_batch_in_order(shared_out):
    from pipeline.data import build_source
    from pipeline.data.tokenizer import load_tokenizer

    cfg = make_cfg(shared_out, "train.global_batch_size=10", "data.bag_size=3", "train.switch_fraction=0.5")
    tok = load_tokenizer(cfg.data, cfg.run.output_dir)
    src = build_source(cfg, cfg.run.output_dir, mode="local", tokenizer=tok)
    for step in (0, 7):
        whole = src.step_windows(step, 0, 1)
        for W in (3, 4, 7):
            parts = [src.step_windows(step, r, W) for r in range(W)]
            assert sorted(len(p) for p in parts)[0] == 10 // W and max(len(p) for p in parts) == -(-10 // W)
            assert torch.equal(torch.cat(parts), whole), (step, W)


# -- SIGTERM: a preemption notice writes a checkpoint and leaves cleanly; --resume continues exactly ------------------
def _tst(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for_step(metrics: str, step: int, proc, timeout: float = 300) -> None:
    from pipeline.train.metrics import JsonlWriter

    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if os.path.exists(metrics) and any(r.get("step", 0) >= step for r in JsonlWriter(metrics).read()):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} never logged; output: {proc.communicate()[0][-2000:]}")


@pytest.fixture(scope="module")
def cli_reference(shared_out, tmp_path_factory):
    """An uninterrupted 120-step Ray-free `tst train` (the reference of the driver-fault tests)."""
    out = str(tmp_path_factory.mktemp("cli"))
    _copy_cache(shared_out, out)
    over = [o for o in BASE if not o.startswith(("train.steps", "train.checkpoint_every", "scaling."))]
    over += ["train.steps=120", "train.checkpoint_every=10", "train.threads=1", f"run.output_dir={out}"]
    ref = _tst("train", "--no-ray", "--name", "ref", *over)
    assert ref.wait(timeout=600) == 0, ref.communicate()[0][-2000:]
    return out, over


def _losses_and_weights(run_dir):
    from pipeline.train.checkpoint import LocalCheckpointManager, load_model_state
    from pipeline.train.metrics import JsonlWriter

    recs = [r for r in JsonlWriter(os.path.join(run_dir, "metrics.jsonl")).read() if "train_loss" in r]
    sd, _ = load_model_state(LocalCheckpointManager(run_dir).latest())
    return [(r["step"], r["train_loss"]) for r in recs], sd


def _same_run(run_dir, ref_dir, redone=()):
    got, sd = _losses_and_weights(run_dir)
    want, ref_sd = _losses_and_weights(ref_dir)
    assert dict(got) == dict(want)  # every step's loss bit-identical to the uninterrupted run
    assert sorted(s for s, _ in got) == sorted([s for s, _ in want] + list(redone))  # no step lost
    assert all(torch.equal(sd[k], ref_sd[k]) for k in ref_sd)


def test_sigterm_writes_a_checkpoint_and_exits_cleanly_and_resume_continues_exactly(cli_reference):
    import signal

    out, over = cli_reference
    proc = _tst("train", "--no-ray", "--name", "term", *over)
    run_dir = os.path.join(out, "runs", "term")
    _wait_for_step(os.path.join(run_dir, "metrics.jsonl"), 5, proc)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, text[-2000:]
    assert "Traceback" not in text and "stopped: term at step" in text
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    stopped_at = summary["step"]
    assert summary["status"] == "stopped" and 5 <= stopped_at < 120
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", f"step_{stopped_at:08d}"))
    again = _tst("train", "--resume", run_dir, "--no-ray")
    text = again.communicate(timeout=600)[0]
    assert again.returncode == 0, text[-2000:]
    _same_run(run_dir, os.path.join(out, "runs", "ref"))
    assert json.load(open(os.path.join(run_dir, "summary.json")))["status"] == "finished"


def test_driver_killed_during_a_checkpoint_write_resumes_exactly(cli_reference):
    """SIGKILL 25 ms into writing step 30's checkpoint: the half-written staging folder is never read; the resume
    continues from step 20 and redoes steps 21-30 (at most one checkpoint interval), bit-identical."""
    import signal

    out, over = cli_reference
    proc = _tst("train", "--no-ray", "--name", "ckill", *over)
    run_dir = os.path.join(out, "runs", "ckill")
    staging = os.path.join(run_dir, "checkpoints", ".tmp-step_00000030")
    t0 = time.time()
    while not os.path.exists(staging):
        assert proc.poll() is None and time.time() - t0 < 300, "the run ended before the checkpoint at step 30"
        time.sleep(0.002)
    time.sleep(0.025)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = _tst("train", "--resume", run_dir, "--no-ray")
    text = again.communicate(timeout=600)[0]
    assert again.returncode == 0, text[-2000:]
    got, _ = _losses_and_weights(run_dir)
    redone = [s for s, _ in got if [x for x, _ in got].count(s) > 1]
    assert 0 < len(set(redone)) <= 10  # <= the checkpoint interval
    _same_run(run_dir, os.path.join(out, "runs", "ref"), redone=sorted(set(redone)))
    assert not [n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.startswith((".tmp-", ".old-"))]


def test_two_runs_of_one_config_are_bit_identical(shared_out, tmp_path):
    """docs/interfaces.md 'Determinism': same commit, config, machine, threads and worker count -> same bits."""
    from pipeline.train.checkpoint import LocalCheckpointManager, load_model_state

    cfg = make_cfg(shared_out, "data.bag_size=3", "train.switch_fraction=0.3")
    runs = []
    for name in ("a", "b"):
        s, recs, _ = run_local(cfg, str(tmp_path / name))
        sd, _ = load_model_state(LocalCheckpointManager(str(tmp_path / name)).latest())
        runs.append(({r["step"]: r["train_loss"] for r in recs if "train_loss" in r}, s["final_val_loss"], sd))
    (la, va, sa), (lb, vb, sb) = runs
    assert la == lb and va == vb and len(la) == 10
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
