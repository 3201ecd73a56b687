"""Elastic training and failure recovery on a real multi-node Ray cluster on this machine.

One run, driven by tests/elastic_driver.py in its own process (its own `ray.cluster_utils.Cluster`: a head without
`train_node` plus two nodes with `train_node: 1`, all on 127.0.0.1, own ports and temp dir; the session's shared Ray
is never touched). The run is elastic, `scaling.min_workers=1, scaling.num_workers=2`, each worker needing a
`train_node`, with a global batch of 4 windows in micro-batches of 1 (2 per worker at 2 workers, 4 at 1):

1. a plain worker kill: rank 1 SIGKILLs itself before step 9 (`TST_INJECT_FAILURE` kill mode); FailureConfig
   restarts the group from the step-5 checkpoint;
2. a hung worker: in the restarted group rank 1 SIGSTOPs itself before step 10 (stop mode); rank 0's collective
   times out after scaling.collective_timeout_s (10 s) and the group restarts from the step-5 checkpoint again;
3. after the step-10 checkpoint the driver removes one train node: the run goes on with world size 1 from that
   checkpoint;
4. the driver adds a train node back: Ray Train's elastic policy grows the group to 2 again (restart from the latest
   checkpoint) and the run finishes.

Every step's loss must equal a plain one-process run of the same config (the loss is the global-batch loss, so it
does not depend on the world size or accumulation), and `raw_tokens` / `latent_positions` must follow the closed
form, so the data position is exact across every restart and resize.

Ray 2.60 behaviour measured here (2026-12-02, 2-core machine shared with other jobs, load average 3-14; printed by
the tests):
- kill -> first step logged after the restart: 16.5-22.7 s (the controller sees the failure 0.4 s after the kill;
  the rest is tearing down the group and starting two new workers: processes, torch, gloo, model, DCP load).
  Steps redone: 3 (steps 6-8; checkpoint at 5, killed before step 9).
- stop -> first step after the restart: 58-64 s: the collective timeout (10 s), then the teardown, which waits for
  the hung rank to destroy its process group: TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, 30 s by default, 5 s as
  pipeline/ray_env.py sets it (the stop -> resume time went from 60.9 s to 58.2 s at higher load), plus the
  worker shutdown's 5 s patience, then a new group. Steps redone: 4.
- node removed -> first step at world size 1: 34-44 s. Ray Train sizes the restarted group from Ray Data's
  AutoscalingCoordinator, whose view of the cluster refreshes once per tick (20 s in Ray 2.60; 2 s here through
  pipeline.ray_internals.coordinator_tick_hook): the first restart may still ask for 2 workers and waits out
  RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default, 20 s here) before restarting with 1.
- node added -> first step at world size 2: 23 s with the 2 s tick (42-51 s with Ray's 20 s): the coordinator's
  next tick, then `elastic_resize_monitor_interval_s` (Ray's default 60 s; the driver passes 5 s to Ray's
  ScalingConfig to keep the test short), then a restart from the latest checkpoint.
- Ray Train's controller collects reports by polling (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default) and a
  worker's `ray.train.report` waits while the previous one is uncollected (queue of size 1): with a report every
  step, a step takes >= 2 s. pipeline/ray_env.py sets 0.5 s.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest

from pipeline.config import Config, apply_overrides
from pipeline.local_cluster import session_pids
from pipeline.ray_env import free_ports

HERE = os.path.dirname(os.path.abspath(__file__))
T = 40
B, L, S = 4, 32, 4
SWITCH = 12  # floor(0.3 * 40 + 0.5)
KILL_AT, STOP_AT, CKPT_EVERY, REMOVE_AFTER = 8, 9, 5, 10

OVERRIDES = [
    "model.preset=tiny", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "model.intermediate_size=128", "data.source=builtin:wiki", "data.max_documents=300", "data.tokenizer=bpe:512",
    f"data.seq_len={L}", "data.val_windows=8", f"data.bag_size={S}", "train.switch_fraction=0.3",
    f"train.steps={T}", f"train.global_batch_size={B}", "train.micro_batch_size=1", "train.lr=3e-3",
    "train.warmup_steps=2", "train.log_every=1", "train.eval_every=5", f"train.checkpoint_every={CKPT_EVERY}",
    "train.keep_checkpoints=3", "scaling.num_workers=2", "scaling.min_workers=1", "scaling.cpus_per_worker=0.5",
    "scaling.max_failures=10", "scaling.collective_timeout_s=10", "scaling.worker_resources={train_node: 1}", "run.tracking=false",
    # the fake nodes share this machine's disk; a real multi-node cluster puts the store on s3:// or gs://
    "data.store_shared=true",
]


def _raw_tokens(step: int) -> int:
    """Closed form of the data position after `step` steps: s*B*L tokens per superposition step, B*L after."""
    return min(step, SWITCH) * S * B * L + max(0, step - SWITCH) * B * L


@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("elastic"))
    temp_dir = tempfile.mkdtemp(prefix="tste", dir="/tmp")  # short: Unix socket paths live under it
    plan = {
        "out": out, "temp_dir": temp_dir, "ports": free_ports(3), "name": "elastic",
        "overrides": OVERRIDES + [f"run.output_dir={out}"],
        "remove_after": REMOVE_AFTER, "shrunk_steps": 2, "resize_interval_s": 5, "coordinator_tick_s": 2, "pace_s": [0.1, 1.5],
        "env": {"TST_INJECT_FAILURE": f"{KILL_AT}:1:kill:{out}/killed,{STOP_AT}:1:stop:{out}/stopped",
                # Ray Train's controller polls workers every 2 s by default and each `ray.train.report` waits for
                # that poll, so with a report every step a step takes >= 2 s; 0.5 s keeps the test short
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"},
    }
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    result_path = os.path.join(out, "result.json")
    log_path = os.path.join(out, "driver.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "elastic_driver.py"), json.dumps(plan),
                                 result_path], cwd=os.path.dirname(HERE), env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=420)
        except subprocess.TimeoutExpired:
            pass
        finally:
            # the driver shuts its cluster down; whatever is left in its session (raylets, workers) is killed here
            for pid in session_pids(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait(10)
            import shutil

            shutil.rmtree(temp_dir, ignore_errors=True)
    log_tail = open(log_path).read()[-6000:]
    assert os.path.exists(result_path), "driver produced no result:\n" + log_tail
    with open(result_path) as f:
        result = json.load(f)
    assert "error" not in result, result["error"] + "\n" + log_tail
    result["log_tail"] = log_tail
    result["out"] = out
    result["kill_marker_t"] = os.path.getmtime(os.path.join(out, "killed"))
    result["stop_marker_t"] = os.path.getmtime(os.path.join(out, "stopped"))

    # the one-process reference: the same config and data, no Ray
    from pipeline.runner import run_training

    ref_cfg = apply_overrides(Config(), plan["overrides"] + ["scaling.min_workers=null", "scaling.num_workers=0",
                                                          "train.threads=1"])
    run_training(ref_cfg, use_ray=False, name="reference", console=False)
    from pipeline.train.metrics import JsonlWriter

    result["reference"] = {r["step"]: r for r in JsonlWriter(os.path.join(out, "runs", "reference",
                                                                            "metrics.jsonl")).read()
                           if "train_loss" in r}
    result["records"] = [r for r in JsonlWriter(os.path.join(out, "runs", "elastic", "metrics.jsonl")).read()
                         if "train_loss" in r]
    return result


def _segments(records):
    """Split the logged steps into attempts: a new attempt starts when the step does not advance (a restart from
    an earlier checkpoint) or the world size changes (a restart with another worker count)."""
    segs, cur = [], []
    for r in records:
        if cur and (r["step"] <= cur[-1]["step"] or r["world_size"] != cur[-1]["world_size"]):
            segs.append(cur)
            cur = []
        cur.append(r)
    return segs + [cur]


def test_elastic_shrinks_continues_and_grows_back(elastic_run):
    recs = elastic_run["records"]
    segs = _segments(recs)
    summary = elastic_run["summary"]
    assert summary["status"] == "finished" and summary["step"] == T, summary
    sizes = [s[0]["world_size"] for s in segs]
    print("\nattempts (first step, last step, world size):", [(s[0]["step"], s[-1]["step"], s[0]["world_size"])
                                                            for s in segs])
    # at least: start (2) -> after the kill (2) -> after the node removal (1) -> grown back (2)
    assert 1 in sizes, sizes
    first_small = sizes.index(1)
    assert 2 in sizes[first_small + 1:], f"never grew back to 2 workers: {sizes}"
    assert sizes[0] == 2 and segs[-1][-1]["step"] == T and segs[-1][-1]["world_size"] == 2
    # every attempt starts right after a checkpoint step (restart from the latest checkpoint)
    for s in segs[1:]:
        resumed_from = s[0]["step"] - 1
        assert resumed_from % CKPT_EVERY == 0 or resumed_from == SWITCH, [r["step"] for r in s][:3]
    # the world-size-1 stretch resumed from the checkpoint at or after the one the node was removed after
    assert segs[first_small][0]["step"] - 1 >= REMOVE_AFTER
    # every step of the run was logged, each one at least once
    assert sorted({r["step"] for r in recs}) == list(range(1, T + 1))

    # exact data position and the same global batch at every world size: each logged step (including redone
    # ones) equals the one-process reference, and the data counters follow the closed form
    ref = elastic_run["reference"]
    # val_loss is the same held-out set whatever the world size (ranks pad, nothing is dropped)
    val_sizes = set()
    for r in recs:
        if "val_loss" in r and "val_loss" in ref.get(r["step"], {}):
            val_sizes.add(r["world_size"])
            assert r["val_loss"] == pytest.approx(ref[r["step"]]["val_loss"], rel=2e-4), (r["step"], r["world_size"])
    assert val_sizes == {1, 2}, val_sizes
    # a node-local token store is refused on this 3-node cluster, in one line, before anything starts
    refusal = elastic_run["node_local_store"]
    assert "is on this node's local disk, but the cluster has 3 nodes" in refusal and "\n" not in refusal
    for r in recs:
        k = r["step"]
        assert r["raw_tokens"] == _raw_tokens(k) == ref[k]["raw_tokens"], k
        assert r["latent_positions"] == k * B * L, k
        assert r["bag_size"] == (S if k <= SWITCH else 1), k
        assert r["train_loss"] == pytest.approx(ref[k]["train_loss"], rel=2e-4, abs=1e-5), \
            (k, r["world_size"], r["train_loss"], ref[k]["train_loss"])
        assert r["grad_norm"] == pytest.approx(ref[k]["grad_norm"], rel=2e-3, abs=1e-5), k


def _recovery(ev, t_fault):
    """From the controller's event log: the failure event after the fault, the reports before it and the first
    report after it (reports of steps trained before the fault can still arrive after it, so split at the
    controller's failure event rather than at the fault's time)."""
    i_err = next((i for i, e in enumerate(ev) if e["kind"] == "worker_error" and e["t"] >= t_fault), None)
    assert i_err is not None, "the controller never saw the failed worker"
    before = [e for e in ev[:i_err] if e["kind"] == "report"]
    after = [e for e in ev[i_err:] if e["kind"] == "report"]
    return ev[i_err], max(e["step"] for e in before if e["checkpoint"]), after[0]


def test_killed_and_hung_workers_recover_from_the_last_checkpoint(elastic_run):
    """The SIGKILLed worker (FailureConfig) and the SIGSTOPped one (collective timeout): time from the fault to
    the first step logged after the restart, and the steps redone (those after the last checkpoint before it)."""
    ev = elastic_run["events"]
    for what, t_fault, at in (("kill", elastic_run["kill_marker_t"], KILL_AT),  # markers: written just before
                              ("stop", elastic_run["stop_marker_t"], STOP_AT)):  # the worker signals itself
        err, last_ckpt, first = _recovery(ev, t_fault)
        assert first["world_size"] == 2  # the node is still there: same size
        assert first["step"] == last_ckpt + 1 == CKPT_EVERY + 1
        # rank 1 failed before step at + 1, so steps 1..at had been trained; the restart began after last_ckpt
        redone = at - (first["step"] - 1)
        print(f"\n{what}->resume: {first['t'] - t_fault:.1f}s (failure seen by the controller after "
              f"{err['t'] - t_fault:.1f}s); steps redone: {redone} (checkpoint at {last_ckpt}, {what} before step {at + 1})")
        assert first["t"] - t_fault < 120
    # the hang is seen through the collective timeout (10 s), not earlier and not much later
    err, _, _ = _recovery(ev, elastic_run["stop_marker_t"])
    assert 9 < err["t"] - elastic_run["stop_marker_t"] < 60
    marks = elastic_run["marks"]
    reports = [e for e in ev if e["kind"] == "report"]
    shrink = [e for e in reports if e["t"] > marks["removed_t"] and e["world_size"] == 1]
    grow = [e for e in reports if e["t"] > marks["added_t"] and e["world_size"] == 2]
    print(f"node removed -> first step at world size 1: {shrink[0]['t'] - marks['remove_t']:.1f}s; "
          f"node added -> first step at world size 2: {grow[0]['t'] - marks['added_t']:.1f}s")
