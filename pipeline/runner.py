"""The driver: prepare a run (tokenizer, data source, MLflow run), launch it with or without Ray, summarise.

Everything a run writes goes under `<run.output_dir>/runs/<name>/`: `config.yaml`, `metrics.jsonl`, checkpoints
(`checkpoints/step_N` for the Ray-free loop, `step_N` directly for Ray Train, whose storage folder is the run
folder), `summary.json` and `loss_curve.png`. The MLflow store defaults to `<output_dir>/mlflow.db`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from typing import Optional

from pipeline.config import Config, ConfigError, check_run_name, validate
from pipeline.errors import NonFiniteLossError, TSTError


@dataclass
class RunPaths:
    name: str
    output_dir: str  # absolute
    run_dir: str
    storage_path: str  # Ray Train storage (the run folder's parent by default)


def run_paths(cfg: Config, name: Optional[str] = None) -> RunPaths:
    output_dir = os.path.abspath(cfg.run.output_dir)
    name = name or cfg.run.name or default_run_name(cfg)
    check_run_name(name)
    storage = cfg.run.storage_path or os.path.join(output_dir, "runs")
    if "://" not in storage:
        storage = os.path.abspath(storage)
    return RunPaths(name, output_dir, os.path.join(output_dir, "runs", name), storage)


def default_run_name(cfg: Config) -> str:
    """s, r and T first (MLflow's run table cuts long names to their start): `s4-r0.3-T300-tiny-20261202-014138`,
    a baseline `s1-T300-tiny-...`."""
    s, r = cfg.data.bag_size, cfg.train.switch_fraction
    kind = "s1" if s == 1 or r == 0 else f"s{s}-r{r:g}"
    return f"{kind}-T{cfg.train.steps}-{cfg.model.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_inputs(cfg: Config) -> None:
    """List the data source (and val_source) now: a missing path is a one-line error in a second, before MLflow,
    Ray or any tokenizing starts."""
    from pipeline.data import is_store_folder, list_files, source_configs

    if not cfg.data.sources and is_store_folder(cfg.data.source):
        return  # a prepared store folder: opened (and checked) by prepare_data
    for _, d, _ in source_configs(cfg.data):
        list_files(d.source, d)
        if d.val_source:
            list_files(d.val_source, d)


def finished_summary(run_dir: str, cfg: Config) -> Optional[dict]:
    """The summary of a run that already trained all of cfg's steps, or None."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            s = json.load(f)
    except (OSError, ValueError):
        return None
    ok = s.get("status") == "finished" and s.get("step") == cfg.train.steps and s.get("final_val_loss") is not None
    return s if ok else None


def prepare_data(cfg: Config, output_dir: str, mode: str, wait: str = "complete", console: bool = False):
    """Tokenizer (trained and cached when `bpe:N`) and the window source over the run's token store (prepared
    once, by Ray Data in mode "ray" or in-process in mode "local"/"memory"); bad input fails here, before workers.
    wait="first": return as soon as the store's first shard is committed, the prepare going on behind.
    A store folder as data.source is opened as it is, with torch only: the "tokenizer" is then the store's
    `StoreVocabulary` (ids from its index; path None)."""
    from pipeline.data import build_source, is_store_folder, store_folder_source

    if not cfg.data.sources and is_store_folder(cfg.data.source):
        return store_folder_source(cfg, cfg.data.source)
    from pipeline.data.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.data, output_dir)
    source = build_source(cfg, output_dir, mode=mode, tokenizer=tok, wait=wait, console=console)
    return tok, source


def _import_in_background(*modules: str) -> None:
    """Import `modules` in a daemon thread while the main thread waits for `ray.init` (which spends most of its
    seconds sleeping until Ray's processes are up): the driver's torch import (~3 s) then overlaps Ray's start
    instead of following it (measured: the run line 0.5-3 s sooner, 2026-12-03). Only modules that do not
    import Ray (checked by tests/test_cli.py), so the two threads never wait on each other's imports. A failure
    here is silent: the main thread's own import raises it."""
    import importlib
    import threading

    def run():
        for m in modules:
            try:
                importlib.import_module(m)
            except Exception:  # noqa: BLE001
                return

    threading.Thread(target=run, daemon=True, name="tst-imports").start()


DRIVER_PRELOAD = ("pipeline.data.batch", "pipeline.train.loop")  # torch, and what the driver needs of it


def check_held_out(cfg: Config, source) -> None:
    """What only the data can tell, right after prepare and before any training: is there a held-out window?"""
    from pipeline.errors import DataError
    from pipeline.train.loop import _split_doc_ids

    if len(_split_doc_ids(source.val_windows())[0]) == 0:
        d = cfg.data
        where = (f"data.val_source={d.val_source!r}" if d.val_source else
                 f"data.val_fraction={d.val_fraction} of the corpus's documents")
        raise DataError(f"no held-out window to evaluate on: {where} gave fewer than seq_len+1 = {d.seq_len + 1} "
                        f"tokens; raise data.val_fraction, set data.val_source, or add documents")


def check_store_reachable(cfg: Config, source) -> None:
    """A local-disk store cannot feed workers on other nodes: refuse it, in one line, on a multi-node cluster."""
    import ray

    from pipeline.data.store import is_remote
    from pipeline.errors import DataError

    local = [u for u in getattr(source, "uris", [source.uri]) if not is_remote(u)]
    if not local or cfg.data.store_shared:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        raise DataError(f"the token store {local[0]} is on this node's local disk, but the cluster has {len(nodes)} "
                        f"nodes; set data.store to s3://... or gs://... (or a shared filesystem with data.store_shared=true)")


def run_training(cfg: Config, *, use_ray: bool = True, name: Optional[str] = None, console: bool = True,
                 extra_callbacks: Optional[list] = None, data_mode: Optional[str] = None,
                 on_metrics=None, device=None, checkpoints: bool = True) -> dict:
    """Train (or resume) one run. Returns the summary dict (also written to summary.json).

    `extra_callbacks`: Ray Train `UserCallback`s (Ray mode). `on_metrics(record)`: called with every record the
    Ray-free loop logs (e.g. a Tune trial forwarding `val_loss` to `ray.tune.report`). Ray-free only: `device`
    (default: CUDA when scaling.use_gpu and available, else CPU) and `checkpoints=False` (no checkpoint writes:
    a throughput measurement). data.source may be a prepared token store folder (`tst data prepare`): then the
    Ray-free path needs nothing but PyTorch (no tokenizers, yaml, Ray or MLflow unless run.tracking is on)."""
    from pipeline.data import is_store_folder

    validate(cfg)
    if use_ray and not cfg.data.sources and is_store_folder(cfg.data.source):
        raise ConfigError(f"data.source={cfg.data.source} is a token store folder, which only the Ray-free loop reads "
                          f"(--no-ray); under Ray give the text source (its store is found by id)")
    check_inputs(cfg)
    paths = run_paths(cfg, name)
    done = finished_summary(paths.run_dir, cfg) if cfg.run.resume else None
    if done is not None:  # a resume of a finished run changes nothing: not its summary, not its MLflow status
        if console:
            print(f"[tst] run {paths.name} already finished at step {done.get('step')}/{cfg.train.steps} (final val "
                  f"loss {done.get('final_val_loss')}); nothing to do. Start a new run with another --name.",
                  flush=True)
        return done
    # Tracking first: an unreachable server is a clear error before anything expensive starts.
    uri = None
    if cfg.run.tracking:
        from pipeline.report.tracking import check_reachable, resolve_tracking_uri

        uri = resolve_tracking_uri(cfg.run.tracking_uri, paths.output_dir)
        check_reachable(uri)
    fresh = not os.path.exists(paths.run_dir)  # removed again if the run fails before its first step
    os.makedirs(paths.run_dir, exist_ok=True)
    _write_config(paths.run_dir, cfg)

    tracker = None
    try:
        if uri is not None:
            from pipeline.report.tracking import MlflowTracker, environment_tags, run_params

            run_id = MlflowTracker.find_run(uri, cfg.run.experiment, paths.name)
            tracker = MlflowTracker(uri, cfg.run.experiment, paths.name, run_id=run_id,
                                    parent_run_id=cfg.run.parent_run_id, display_name=cfg.run.display_name)
            tracker.log_params(run_params(cfg))  # redacted by log_params; model.* once the vocabulary is known
            world = max(1, cfg.scaling.num_workers) if use_ray else 1
            tracker.set_tags(environment_tags(world))

        mode = data_mode or ("ray" if use_ray else "local")
        if use_ray or mode == "ray":
            from pipeline.ray_session import ensure_ray

            _import_in_background(*DRIVER_PRELOAD)
            ensure_ray(cfg)  # the prepare (Ray Data) and the TorchTrainer need a running Ray
        # Training starts once the store's first shard is committed; the prepare (if any) goes on behind it.
        tok, source = prepare_data(cfg, paths.output_dir, mode, wait="first", console=console)
        if tracker is not None:
            from pipeline.report.tracking import model_params

            tracker.log_params(model_params(cfg, tok.vocab_size))
        check_held_out(cfg, source)
        if use_ray:
            check_store_reachable(cfg, source)
    except BaseException:
        if tracker is not None:  # never leave the MLflow run RUNNING after bad input
            tracker.end("FAILED")
        if fresh:  # nor a run folder that never trained
            import shutil

            shutil.rmtree(paths.run_dir, ignore_errors=True)
        raise
    if console:
        print(f"[tst] run {paths.name}: {cfg.model.preset} model, T={cfg.train.steps}, "
              f"s={cfg.data.bag_size}, r={cfg.train.switch_fraction}, batch={cfg.train.global_batch_size}x"
              f"{cfg.data.seq_len}, {'Ray Train x' + str(cfg.scaling.num_workers) if use_ray else 'one process'}",
              flush=True)
        print(f"[tst] outputs: {paths.run_dir}", flush=True)

    t0 = time.perf_counter()
    status = "FAILED"
    stop_signal = None
    if use_ray:
        from pipeline.train.ray_train import StopSignal

        stop_signal = StopSignal()
    try:
        with _sigterm_stops(stop_signal, console):
            if use_ray:
                summary = _fit_ray(cfg, paths, source, tok, tracker, console, extra_callbacks, stop_signal)
            else:
                summary = _fit_local(cfg, paths, source, tok, tracker, console, on_metrics, device, checkpoints)
        status = {"finished": "FINISHED", "stopped": "KILLED"}.get(summary.get("status"), "FAILED")
    finally:
        _close_source(source)
        if tracker is not None:
            _finish_tracking(tracker, paths, cfg, status, source)
    summary["wall_s"] = time.perf_counter() - t0
    summary["data"] = data_summary(source)
    summary["run_name"] = paths.name
    summary["run_dir"] = paths.run_dir
    if tracker is not None:
        summary["mlflow_run_id"] = tracker.run_id
        summary["tracking_uri"] = tracker.uri
    with open(os.path.join(paths.run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    if summary.get("status") == "nonfinite":
        raise NonFiniteLossError(summary.get("message", "non-finite loss"))
    if console:
        print_summary(summary)
    return summary


def _write_config(run_dir: str, cfg: Config) -> None:
    """config.yaml (what `tst train --resume` and `tst compare` read); config.json where yaml is not installed
    (a torch-only GPU machine training from a store folder)."""
    try:
        text, name = cfg.to_yaml(), "config.yaml"
    except ImportError:
        text, name = json.dumps(cfg.to_dict(), indent=1), "config.json"
    with open(os.path.join(run_dir, name), "w") as f:
        f.write(text)


def _fit_local(cfg, paths, source, tok, tracker, console, on_metrics=None, device=None, checkpoints=True) -> dict:
    from pipeline.train.loop import LocalReporter, train
    from pipeline.train.metrics import MetricsSink

    import torch

    sink = MetricsSink(paths.run_dir, cfg.train.steps, tracker=tracker, console=console,
                       listeners=[on_metrics] if on_metrics else None)
    reporter = LocalReporter(paths.run_dir, sink, keep=cfg.train.keep_checkpoints, resume=cfg.run.resume)
    if device is None:
        device = torch.device("cuda") if cfg.scaling.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    return train(cfg, source, reporter, vocab_size=tok.vocab_size, device=device, tokenizer_path=tok.path,
                 checkpoints=checkpoints)


def train_in_process(cfg: Config, name: Optional[str] = None, *, console: bool = True, device=None,
                     checkpoints: bool = True, on_metrics=None, quiet_warnings: bool = True) -> dict:
    """One run through the Ray-free loop (`run_training(use_ray=False)`) for scripts and studies (bench/speedup.py,
    bench/gpu_check.py, `pipeline.study`): also records the machine's load average around the run and this
    process's seconds (`compute_s`, start-up and data loading included) in the summary and its summary.json, and
    raises TSTError when the run did not finish. quiet_warnings: hide warnings (the schedule checks' warnings of
    short runs; the switch check stays in the log)."""
    import warnings

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        if quiet_warnings:
            warnings.simplefilter("ignore")
        summary = dict(run_training(cfg, use_ray=False, name=name, console=console, on_metrics=on_metrics,
                                    device=device, checkpoints=checkpoints))
    summary["compute_s"] = time.perf_counter() - t0
    summary["loadavg_start"], summary["loadavg_end"] = list(load0), list(os.getloadavg())
    summary["threads"] = cfg.train.threads
    p = os.path.join(summary.get("run_dir") or run_paths(cfg, name).run_dir, "summary.json")
    if os.path.isfile(p):  # keep the load and process time with the run (read back by a study's --reuse)
        with open(p) as f:
            on_disk = json.load(f)
        on_disk.update({k: summary[k] for k in ("compute_s", "loadavg_start", "loadavg_end", "threads")})
        with open(p, "w") as f:
            json.dump(on_disk, f, indent=1, default=str)
    if summary.get("status") not in (None, "finished"):
        raise TSTError(f"run {summary.get('run_name') or name} did not finish: {summary.get('status')} "
                       f"{summary.get('message', '')}")
    return summary


@contextlib.contextmanager
def _sigterm_stops(stop_signal, console: bool):
    """While training, SIGTERM (a spot preemption notice, `kill`, Ray's job stop) asks the run to write a
    checkpoint at the end of the current step and leave cleanly (status "stopped"; `--resume` continues). Only
    the main thread can install a handler: elsewhere (a Tune trial's thread) the signal keeps its default."""
    import signal
    import threading

    from pipeline.train import loop

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        loop.STOP["requested"] = True
        if stop_signal is not None:
            stop_signal.request()
        if console:
            print("[tst] SIGTERM: stopping after this step's checkpoint", flush=True)

    loop.STOP["requested"] = False
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        loop.STOP["requested"] = False


def _fit_ray(cfg, paths, source, tok, tracker, console, extra_callbacks, stop_signal=None) -> dict:
    from pipeline.train.ray_train import build_trainer

    with open(tok.path) as f:
        tok_json = f.read()
    trainer = build_trainer(
        cfg, source=source, vocab_size=tok.vocab_size, tokenizer_json=tok_json, run_name=paths.name,
        run_dir=paths.run_dir, storage_path=paths.storage_path,
        tracking_uri=tracker.uri if tracker else None, mlflow_run_id=tracker.run_id if tracker else None,
        extra_callbacks=extra_callbacks, console=console, stop_signal=stop_signal)
    from pipeline.train.ray_train import release_earlier_reservations

    release_earlier_reservations(paths.run_dir, trainer)
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; surface the root cause in one line
        root = _root_cause(e)
        own = getattr(root, "worker_error", None)  # a FatalWorkerError: the worker's own error, when it is ours
        if isinstance(own, (TSTError, ConfigError)):
            raise own from None
        if isinstance(root, TSTError):
            raise root from None
        raise
    # result.metrics are those of the last checkpoint; the run's final summary is the controller's last record
    from pipeline.train.metrics import JsonlWriter

    finals = [r for r in JsonlWriter(os.path.join(paths.run_dir, "metrics.jsonl")).read() if r.get("kind") == "final"]
    summary = dict(finals[-1]) if finals else dict(result.metrics or {})
    if result.error is not None and not finals:
        raise result.error
    if result.checkpoint is not None:
        summary["checkpoint"] = result.checkpoint.path
    if summary.get("status") == "nonfinite" and result.checkpoint is not None:
        summary["message"] = summary.get("message", "").replace("Last good checkpoint: none",
                                                                f"Last good checkpoint: {result.checkpoint.path}")
    return summary


def _root_cause(e: BaseException) -> BaseException:
    """The error under Ray's wrappers (`__cause__` chains, and a ControllerError's `controller_failure`, which
    survives pickling where `__cause__` does not)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = getattr(e, "controller_failure", None) or getattr(e, "__cause__", None)
        if nxt is None:
            break
        e = nxt
    return e


def _close_source(source) -> None:
    """Stop a prepare still running behind a finished run (its committed shards stay; the next prepare resumes)."""
    try:
        source.close()
    except Exception:  # noqa: BLE001 - closing must not hide the run's own outcome
        pass


def data_summary(source) -> dict:
    """What the data did: the store, its size, and what reading the corpus skipped (summary.json and MLflow)."""
    try:
        store = source.store
        store.refresh()
        st = store.stats
        return {"store": source.uri, "complete": store.complete, "train_tokens": store.tokens("train"),
                "val_tokens": store.tokens("val"), "documents": st.get("documents"),
                "val_documents": st.get("val_documents"), "records": st.get("records"),
                "invalid_utf8": st.get("invalid_utf8"), "nul_documents": st.get("nul_documents"),
                "skipped": st.get("skipped")}
    except Exception as e:  # noqa: BLE001 - a summary line must not fail a finished run
        return {"store": getattr(source, "uri", None), "error": str(e)}


def _finish_tracking(tracker, paths, cfg, status: str, source=None) -> None:
    from pipeline.train.metrics import JsonlWriter
    from pipeline.report.tracking import loss_curve_png

    if source is not None:
        d = data_summary(source)
        flat = {f"data_{k}": v for k, v in d.items() if isinstance(v, int) and not isinstance(v, bool)}
        flat.update({f"data_skipped_{k}": v for k, v in (d.get("skipped") or {}).items()})
        if flat:
            tracker.log_metrics(flat, step=0)
        tracker.set_tags({"tst.data_store": str(d.get("store"))})
    history = JsonlWriter(os.path.join(paths.run_dir, "metrics.jsonl")).read()
    tracker.flush_pending()
    # back-fill anything the server missed while it was away: metrics.jsonl is the record of truth
    tracker.backfill(history)
    png = loss_curve_png(history, os.path.join(paths.run_dir, "loss_curve.png"), paths.name,
                         switch_step=next((h.get("switch_step") for h in history if h.get("switch_step")), None))
    if png:
        tracker.log_artifact(png)
    _log_redacted_config(tracker, cfg)
    tracker.end(status)


def _log_redacted_config(tracker, cfg: Config) -> None:
    """config.yaml as an MLflow artifact, with credentials masked (the run folder's copy keeps them)."""
    import tempfile

    import yaml

    from pipeline.config import redact_secrets

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(redact_secrets(cfg.to_dict()), f, sort_keys=False)
        tracker.log_artifact(path)


def print_summary(summary: dict) -> None:
    v = summary.get("final_val_loss")
    if summary.get("status") == "stopped":
        print(f"[tst] stopped: {summary.get('run_name')} at step {summary.get('step')} (checkpoint written); "
              f"continue with `tst train --resume {summary.get('run_name')}`", flush=True)
        return
    print(
        f"[tst] done: {summary.get('run_name')} | steps {summary.get('step')} | final val loss "
        f"{v:.4f} | raw tokens {summary.get('raw_tokens', 0):,}"
        f"{' (%.2f passes over the corpus)' % summary['epochs'] if summary.get('epochs') else ''} | "
        f"{summary.get('wall_s', 0):.0f}s" if isinstance(v, (int, float)) else f"[tst] done: {summary}",
        flush=True)
    if summary.get("mlflow_run_id"):
        from pipeline.report.tracking import mlflow_command

        print(f"[tst] MLflow: run {summary['mlflow_run_id']} in {summary.get('tracking_uri')} — browse with "
              f"`{mlflow_command()} ui --backend-store-uri {summary.get('tracking_uri')}`", flush=True)
