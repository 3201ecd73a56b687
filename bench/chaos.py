#!/usr/bin/env python
"""Faults on the default path against an uninterrupted run (issue 15): all in one run, or one at a time.

    python bench/chaos.py --combined --seeds 0,1,2 --out outputs/chaos-combined   # every fault kind in one run
    python bench/chaos.py --seeds 0,1,2 --out outputs/chaos     # one case per fault; ~15-25 min per seed

--combined: one elastic `tst train` with 3 workers on a local multi-node `ray.cluster_utils.Cluster`, a real
`mlflow server` and a token store still being prepared, into which a seeded schedule injects every fault kind
in turn (pipeline/study/chaos.py says which and how it measures them); an uninterrupted 3-worker run on the same
kind of cluster (trained once, by the first seed's cluster) is the reference. Prints one row per fault and the
run's totals, and writes <out>/combined.json.

Without --combined (the earlier bench, kept as history):

Every case is a real `tst train` (a subprocess, so the driver can be signalled): the tiny test model, 2 Ray Train
workers on a local Ray, the token store, checkpoints every 5 steps, TST_WINDOW_DIGESTS on. A seed picks each
fault's step. Cases:
  worker_kill     SIGKILL of rank 1 before step k (FailureConfig restarts the group from the last checkpoint)
  worker_stop     SIGSTOP of rank 1 before step k (a hang: rank 0's collective times out after 15 s)
  driver_term     SIGTERM of the driver after step k (checkpoint, clean exit), then `tst train --resume`
  driver_kill     SIGKILL of the driver's whole process group while step k's checkpoint is being written, then
                  `tst train --resume`
  mlflow_restart  the run logs to a real `mlflow server`, killed after step k and restarted 8 steps later
  prepare_kill    `tst data prepare` of a fresh store SIGKILLed mid-way; the run then takes over the prepare
Per case it prints: finished or not, time from the fault to the next training step, steps redone, windows lost
or repeated (from the digests of the windows the workers actually consumed, against the uninterrupted run),
whether every loss and the final weights are bit-identical to the uninterrupted run (same worker count), MLflow
runs left RUNNING, and staging folders left in <tmp>/tst-staging.

Node removal and re-addition, and faults combined in one run: --combined.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

T = 40
BASE = ["model.preset=tiny", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.intermediate_size=128", "data.source=builtin:wiki", "data.max_documents=300",
        "data.tokenizer=bpe:512", "data.seq_len=32", "data.val_windows=8", f"train.steps={T}",
        "train.global_batch_size=4", "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=1",
        "train.eval_every=10", "train.checkpoint_every=5", "train.keep_checkpoints=20", "train.threads=1",
        "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "scaling.max_failures=3",
        "scaling.collective_timeout_s=15", "run.tracking=false"]
CASES = ("worker_kill", "worker_stop", "driver_term", "driver_kill", "mlflow_restart", "prepare_kill")


def tst(args, env=None, new_session=False, log=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=e, text=True,
                            stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=new_session)


class Watch:
    """Arrival time of every metrics.jsonl record of a run (polled from this process)."""

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.seen, self.arrivals = 0, []  # [(wall time, record)]

    def poll(self):
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.read().splitlines()
        now = time.time()
        for ln in lines[self.seen:]:
            try:
                self.arrivals.append((now, json.loads(ln)))
            except ValueError:
                return  # a line being written
            self.seen += 1

    def wait_step(self, step, proc=None, timeout=900):
        t0 = time.time()
        while time.time() - t0 < timeout:
            self.poll()
            if any(r.get("step", 0) >= step and "train_loss" in r for _, r in self.arrivals):
                return
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the run exited ({proc.returncode}) before step {step}")
            time.sleep(0.02)
        raise TimeoutError(f"step {step} not reached in {timeout} s")

    def after(self, t):
        return next((w for w, r in self.arrivals if w > t and "train_loss" in r), None)


def windows(folder):
    """{(step, row): digest} of the run's surviving trajectory, from the digests the workers wrote
    (pipeline.train.loop.read_digests: a row a redone step read differently is "conflict", so it counts as lost)."""
    from pipeline.train.loop import read_digests

    if not os.path.isdir(folder):
        return {}
    return {(step, row): d for step, rows in read_digests(folder).items() for row, d in rows.items()}


def run_case(case, seed, out, ref):
    from pipeline.train.checkpoint import load_model_state
    from pipeline.train.metrics import JsonlWriter

    rng = random.Random(f"{case}-{seed}")
    k = rng.randint(8, T - 10)
    name = f"{case}-s{seed}"
    run_dir = os.path.join(out, "runs", name)
    dg = os.path.join(out, "digests", name)
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(dg, ignore_errors=True)
    env = {"TST_WINDOW_DIGESTS": dg}
    over = BASE + [f"run.output_dir={out}"]
    log = open(os.path.join(out, f"{name}.log"), "w")
    watch = Watch(run_dir)
    fault_t, extra, server = None, {}, None
    if case in ("worker_kill", "worker_stop"):
        env["TST_INJECT_FAILURE"] = f"{k}:1:{'kill' if case == 'worker_kill' else 'stop'}:{dg}.marker"
        p = tst(["train", "--name", name, *over], env, log=log)
        watch.wait_step(k - 1, p)
        fault_t = time.time()  # the fault fires as step k starts
        p.wait()
    elif case == "driver_term":
        p = tst(["train", "--name", name, *over], env, log=log)
        watch.wait_step(k, p)
        fault_t = time.time()
        p.send_signal(signal.SIGTERM)
        extra["term_exit"] = p.wait(timeout=300)
        p = tst(["train", "--resume", run_dir], env, log=log)
        p.wait()
    elif case == "driver_kill":
        staging = os.path.join(tempfile.gettempdir(), "tst-staging")
        ck = 5 * (k // 5)
        p = tst(["train", "--name", name, *over], env, new_session=True, log=log)
        while not any(n.startswith(f"step{ck:08d}-") for n in (os.listdir(staging) if os.path.isdir(staging) else [])):
            if p.poll() is not None:
                raise RuntimeError("the run ended before the checkpoint")
            time.sleep(0.005)
        time.sleep(0.025)  # 25 ms into the checkpoint write
        fault_t = time.time()
        os.killpg(p.pid, signal.SIGKILL)  # the driver and the local Ray it started: a lost head node
        p.wait()
        extra["killed_at_checkpoint"] = ck
        p = tst(["train", "--resume", run_dir], env, log=log)
        p.wait()
    elif case == "mlflow_restart":
        from pipeline.local_cluster import mlflow_server_env
        from pipeline.ray_env import free_port

        port = free_port()
        store = f"sqlite:///{out}/mlflow-{name}.db"

        def start_server():
            return subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "mlflow"), "server",
                                     "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port),
                                     "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                    env=mlflow_server_env())

        server = start_server()
        wait_port(port)
        uri = f"http://127.0.0.1:{port}"
        p = tst(["train", "--name", name, *over, "run.tracking=true", f"run.tracking_uri={uri}"], env, log=log)
        watch.wait_step(k, p)
        fault_t = time.time()
        server.send_signal(signal.SIGKILL)
        server.wait()
        watch.wait_step(k + 8, p)
        server = start_server()
        wait_port(port)
        p.wait()
        extra["mlflow"] = mlflow_state(uri, name)
    elif case == "prepare_kill":
        over = over + [f"data.store={out}/stores-{name}", "data.writer_timeout_s=10", "data.shard_tokens=2000"]
        shutil.rmtree(f"{out}/stores-{name}", ignore_errors=True)
        prep = tst(["data", "prepare", "--no-ray", *over], {"TST_PREPARE_THROTTLE_S": "0.5"}, log=log)
        while not glob_any(f"{out}/stores-{name}", "train-00001.tok"):
            if prep.poll() is not None:
                raise RuntimeError("the prepare ended before its second shard")
            time.sleep(0.05)
        fault_t = time.time()
        prep.send_signal(signal.SIGKILL)
        prep.wait()
        p = tst(["train", "--name", name, *over], env, log=log)
        p.wait()
    watch.poll()
    log.close()
    summary = json.load(open(os.path.join(run_dir, "summary.json"))) if os.path.exists(
        os.path.join(run_dir, "summary.json")) else {}
    recs = [r for r in JsonlWriter(os.path.join(run_dir, "metrics.jsonl")).read() if "train_loss" in r]
    steps = [r["step"] for r in recs]
    losses = {r["step"]: r["train_loss"] for r in recs}
    run_eff, ref_eff = windows(dg), ref["windows"]
    lost = sum(1 for key, d in ref_eff.items() if run_eff.get(key) != d)
    ref_count, run_count = {}, {}
    for d in ref_eff.values():
        ref_count[d] = ref_count.get(d, 0) + 1
    for d in run_eff.values():
        run_count[d] = run_count.get(d, 0) + 1
    repeated = sum(max(0, n - ref_count.get(d, 0)) for d, n in run_count.items())
    same_w = None
    final = os.path.join(run_dir, f"step_{T:08d}")
    if os.path.isdir(final):
        sd, _ = load_model_state(final)
        same_w = all(bool((sd[n] == ref["weights"][n]).all()) for n in sd)
    nxt = watch.after(fault_t) if fault_t else None
    return {"case": case, "seed": seed, "fault_step": k, "finished": summary.get("status") == "finished",
            "to_next_step_s": round(nxt - fault_t, 1) if nxt else None,
            "steps_redone": len(steps) - len(set(steps)), "windows_lost": lost, "windows_repeated": repeated,
            "losses_identical": losses == ref["losses"], "weights_identical": same_w,
            "staging_left": len(staging_left()), **extra}


def staging_left():
    root = os.path.join(tempfile.gettempdir(), "tst-staging")
    from pipeline.train.checkpoint import sweep_staging

    if os.path.isdir(root):
        sweep_staging(root)  # what a next run would remove; anything left belongs to a live process
        return os.listdir(root)
    return []


def glob_any(folder, name):
    return os.path.isdir(folder) and any(os.path.exists(os.path.join(folder, d, name)) for d in os.listdir(folder))


def wait_port(port, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port}")


def mlflow_state(uri, name):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("tst")
    runs = c.search_runs([exp.experiment_id]) if exp else []
    mine = [r for r in runs if r.data.tags.get("tst.run_name") == name]
    steps = sorted({m.step for m in c.get_metric_history(mine[0].info.run_id, "train_loss")}) if mine else []
    return {"running_left": sum(r.info.status == "RUNNING" for r in runs),
            "train_loss_steps_in_mlflow": len(steps)}


def reference(out):
    from pipeline.train.checkpoint import load_model_state
    from pipeline.train.metrics import JsonlWriter

    name, dg = "reference", os.path.join(out, "digests", "reference")
    run_dir = os.path.join(out, "runs", name)
    if not os.path.exists(os.path.join(run_dir, "summary.json")):
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(dg, ignore_errors=True)
        with open(os.path.join(out, "reference.log"), "w") as log:
            assert tst(["train", "--name", name, *BASE, f"run.output_dir={out}"], {"TST_WINDOW_DIGESTS": dg},
                       log=log).wait() == 0, "the reference run failed"
    recs = [r for r in JsonlWriter(os.path.join(run_dir, "metrics.jsonl")).read() if "train_loss" in r]
    sd, _ = load_model_state(os.path.join(run_dir, f"step_{T:08d}"))
    return {"losses": {r["step"]: r["train_loss"] for r in recs}, "windows": windows(dg), "weights": sd}


def combined(seeds, out):
    from pipeline.study import chaos

    results_path = os.path.join(out, "combined.json")
    done = json.load(open(results_path)) if os.path.exists(results_path) else {}  # resumes where it stopped
    ref_out = None
    for seed in seeds:
        sub = os.path.join(out, f"seed{seed}")
        if str(seed) not in done:
            first = ref_out is None and not os.path.exists(os.path.join(out, "reference.json"))
            t0 = time.time()
            res = chaos.run_combined(seed, sub, reference="cluster" if first else "none")
            if first and "error" not in res:
                json.dump({"out": sub}, open(os.path.join(out, "reference.json"), "w"))
            ref_dir = json.load(open(os.path.join(out, "reference.json")))["out"] if os.path.exists(
                os.path.join(out, "reference.json")) else None
            a = {"error": res.get("error")}
            if ref_dir and res.get("records"):
                losses, windows, weights = chaos.cluster_reference(ref_dir)
                a = chaos.analyse(res, losses, windows, weights, bitwise=True)
            a["summary"] = {**a.get("summary", {}), "error": res.get("error"), "wall_s": round(time.time() - t0),
                            "processes_left": res.get("processes_left"), "tmp_left": res.get("tmp_left"),
                            "staging_left": res.get("staging_left"), "mlflow": res.get("mlflow"),
                            "reference_s": res.get("reference_s"), "driver_exit": res.get("driver_exit")}
            done[str(seed)] = a
            json.dump(done, open(results_path, "w"), indent=1)
        a = done[str(seed)]
        print(json.dumps({"seed": seed, **a.get("summary", {})}), flush=True)
    rows = [{"seed": s, **f} for s in seeds for f in done.get(str(s), {}).get("faults", [])]
    print("\n" + chaos.table(rows))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--combined", action="store_true", help="every fault kind in one run on a multi-node Ray")
    ap.add_argument("--out", default="outputs/chaos")
    a = ap.parse_args(argv)
    out = os.path.abspath(a.out)
    if a.combined:
        os.makedirs(out, exist_ok=True)
        return combined([int(x) for x in a.seeds.split(",")], out)
    os.makedirs(out, exist_ok=True)
    ref = reference(out)
    results_path = os.path.join(out, "results.jsonl")
    done = set()
    if os.path.exists(results_path):  # resumes where it stopped
        done = {(r["case"], r["seed"]) for r in map(json.loads, open(results_path))}
    for seed in [int(x) for x in a.seeds.split(",")]:
        for case in a.cases.split(","):
            if (case, seed) in done:
                continue
            t0 = time.time()
            try:
                r = run_case(case, seed, out, ref)
            except Exception as e:  # noqa: BLE001 - a case that breaks is a result too
                r = {"case": case, "seed": seed, "finished": False, "error": f"{type(e).__name__}: {e}"}
            r["wall_s"] = round(time.time() - t0)
            print(json.dumps(r), flush=True)
            with open(results_path, "a") as f:
                f.write(json.dumps(r) + "\n")
    rows = [json.loads(x) for x in open(results_path)]
    cols = ["case", "seed", "fault_step", "finished", "to_next_step_s", "steps_redone", "windows_lost",
            "windows_repeated", "losses_identical", "weights_identical", "staging_left"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
