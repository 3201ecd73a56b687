"""The two-phase trainer: Ray-free loop, checkpoints and exact resume, TorchTrainer + FSDP2 parity, failures.

Real pieces throughout: the bundled Wikipedia corpus tokenized by a BPE trained with HF `tokenizers`, the real
model and fused loss, DCP checkpoints, Ray Train with 2 gloo workers and FSDP2, MLflow on SQLite.
"""

import json
import os
import shutil

import pytest
import torch

from pipeline.config import Config, apply_overrides
from pipeline.data import build_source
from pipeline.train.loop import LocalReporter, Trainer
from pipeline.train.metrics import JsonlWriter, MetricsSink
from pipeline.data.tokenizer import load_tokenizer

BASE = [
    "model.preset=tiny", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "model.intermediate_size=128",
    "data.source=builtin:wiki", "data.max_documents=300", "data.tokenizer=bpe:512", "data.seq_len=32",
    "data.val_windows=8",
    "train.steps=10", "train.global_batch_size=4", "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=1",
    "train.eval_every=5", "train.checkpoint_every=4", "train.keep_checkpoints=5",
    "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "scaling.max_failures=2",
    "run.tracking=false",
]


@pytest.fixture(scope="module")
def shared_out(tmp_path_factory):
    """One output dir per module so the tokenizer and tokenized corpus are built once (cached)."""
    return str(tmp_path_factory.mktemp("out"))


def make_cfg(shared_out, *extra) -> Config:
    return apply_overrides(Config(), BASE + [f"run.output_dir={shared_out}"] + list(extra))


def run_local(cfg: Config, run_dir: str, resume: bool = True) -> tuple[dict, list[dict], Trainer]:
    tok = load_tokenizer(cfg.data, cfg.run.output_dir)
    src = build_source(cfg, cfg.run.output_dir, mode="local", tokenizer=tok)
    sink = MetricsSink(run_dir, cfg.train.steps, console=False)
    trainer = Trainer(cfg, src, LocalReporter(run_dir, sink, keep=cfg.train.keep_checkpoints, resume=resume),
                      vocab_size=tok.vocab_size, tokenizer_path=tok.path)
    summary = trainer.run()
    return summary, [r for r in sink.history if r.get("kind") != "final"], trainer


def losses(records) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def test_switch_happens_at_round_rT_and_keeps_optimizer_state(shared_out, tmp_path):
    cfg = make_cfg(shared_out, "data.bag_size=4", "train.switch_fraction=0.25")  # floor(0.25*10 + 0.5) = 3
    tok = load_tokenizer(cfg.data, cfg.run.output_dir)
    src = build_source(cfg, cfg.run.output_dir, mode="local", tokenizer=tok)
    tr = Trainer(cfg, src, LocalReporter(str(tmp_path), None, resume=False), vocab_size=tok.vocab_size)
    assert tr.switch_step == 3
    assert [tr.bag_size_at(t) for t in range(5)] == [4, 4, 4, 1, 1]
    tr._t_start = 0.0
    it = src.iter_steps(0, 0, 1)
    seen = []
    for step in range(5):
        got, windows = next(it)
        assert got == step
        seen.append(tuple(windows.shape))
        tr.train_step(step, windows)
        p = tr.model.lm_head.weight
        state = tr.optimizer.state[p]
        # AdamW state continues across the switch: one optimizer step per training step, never reset
        assert int(state["step"]) == step + 1
        if step == 2:  # last superposition step
            v_at_switch = state["exp_avg_sq"].clone()
        if step == 3:  # first recovery step: v = beta2 * v_prev + (1 - beta2) g^2 >= beta2 * v_prev everywhere;
            # a reset optimizer would hold only (1 - beta2) g^2, far below beta2 * v_prev
            assert bool((state["exp_avg_sq"] >= cfg.train.beta2 * v_at_switch * (1 - 1e-6)).all())
    L = cfg.data.seq_len
    # superposition windows are s*L + s raw tokens, recovery windows L + 1; the same global batch of 4
    assert seen == [(4, 4 * L + 4)] * 3 + [(4, L + 1)] * 2
    lrs = [tr.lr_at(t) for t in range(4)]
    assert lrs[2] == lrs[3] == cfg.train.lr  # the LR schedule runs on across the switch (stable stretch)


def test_run_phases_and_metrics(shared_out, tmp_path):
    cfg = make_cfg(shared_out, "data.bag_size=4", "train.switch_fraction=0.3")  # switch at 3
    summary, recs, _ = run_local(cfg, str(tmp_path))
    assert summary["status"] == "finished" and summary["step"] == 10
    phases = {r["step"]: r["phase"] for r in recs}
    assert [phases[i] for i in range(1, 11)] == ["superposition"] * 3 + ["recovery"] * 7
    assert "train_loss_superposition" in recs[0] and "train_loss_recovery" in recs[-1]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in recs)
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(vals) == 3  # steps 3 (switch), 5, 10
    # raw tokens: 3 superposition steps read s=4 times the tokens of a recovery step
    B, L = 4, 32
    assert recs[-1]["raw_tokens"] == 3 * B * 4 * L + 7 * B * L
    assert recs[-1]["latent_positions"] == 10 * B * L
    for k in ("tokens_per_s", "positions_per_s", "step_time_s", "data_wait_frac", "lr", "grad_norm", "flops"):
        assert k in recs[-1]
    # superposition: the phase loss is the multi-hot CE (floors near log s), labelled as such
    assert recs[0]["bag_size"] == 4 and recs[-1]["bag_size"] == 1


def test_resume_reproduces_uninterrupted_losses_exactly(shared_out, tmp_path):
    cfg = make_cfg(shared_out, "data.bag_size=4", "train.switch_fraction=0.3")
    full_dir, resumed_dir = str(tmp_path / "full"), str(tmp_path / "resumed")
    _, full, _ = run_local(cfg, full_dir)
    # a "killed" run: only its step-4 checkpoint survived
    os.makedirs(os.path.join(resumed_dir, "checkpoints"))
    shutil.copytree(os.path.join(full_dir, "checkpoints", "step_00000004"),
                    os.path.join(resumed_dir, "checkpoints", "step_00000004"))
    summary, resumed, trainer = run_local(cfg, resumed_dir)
    assert summary["step"] == 10
    a, b = losses(full), losses(resumed)
    assert sorted(b) == list(range(5, 11))
    for step in b:
        assert a[step] == b[step], f"step {step}: {a[step]} != {b[step]}"  # bitwise: same data, same state
    assert summary["final_val_loss"] == [r["val_loss"] for r in full if r["step"] == 10][0]


def test_checkpoint_is_atomic_and_pruned(shared_out, tmp_path):
    from pipeline.train.checkpoint import LocalCheckpointManager, is_complete

    cfg = make_cfg(shared_out, "train.keep_checkpoints=2")
    run_local(cfg, str(tmp_path))
    mgr = LocalCheckpointManager(str(tmp_path), keep=2)
    names = [os.path.basename(p) for p in mgr.list()]
    assert names == ["step_00000008", "step_00000010"]  # newest 2 of 4, 8, 10
    # a crashed save (staging folder without meta.json) is never taken as the latest checkpoint
    crashed = mgr.staging_dir(12)
    os.makedirs(crashed)
    open(os.path.join(crashed, ".metadata"), "w").close()
    assert not is_complete(crashed)
    assert os.path.basename(mgr.latest()) == "step_00000010"
    with pytest.raises(RuntimeError):
        mgr.publish(crashed, 12)
    assert os.path.basename(mgr.latest()) == "step_00000010"
    meta = json.load(open(os.path.join(mgr.latest(), "meta.json")))
    assert meta["step"] == 10 and meta["data_position"] == 10 * 4 * 32
    assert os.path.exists(os.path.join(mgr.latest(), "tokenizer.json"))


def test_resume_refuses_a_different_run(shared_out, tmp_path):
    from pipeline.config import ConfigError

    cfg = make_cfg(shared_out, "train.steps=4")
    run_local(cfg, str(tmp_path))
    other = make_cfg(shared_out, "train.steps=8")
    with pytest.raises(ConfigError, match="train.steps"):
        run_local(other, str(tmp_path))


def test_nonfinite_loss_stops_cleanly_naming_step_and_checkpoint(shared_out, tmp_path):
    from pipeline.errors import NonFiniteLossError
    from pipeline.runner import run_training

    cfg = make_cfg(shared_out, "train.lr=1e12", "train.warmup_steps=0", "train.grad_clip=0",
                   "train.checkpoint_every=1", f"run.output_dir={tmp_path}", "train.steps=30")
    shutil.copytree(shared_out, str(tmp_path), dirs_exist_ok=True)  # reuse the cached tokenizer
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss or gradient norm at step \d+.*Last good checkpoint: /"):
        run_training(cfg, use_ray=False, name="nan", console=False)


def test_unreachable_mlflow_fails_before_training(shared_out, tmp_path):
    from pipeline.errors import TrackingError
    from pipeline.runner import run_training

    cfg = make_cfg(shared_out, "run.tracking=true", "run.tracking_uri=http://127.0.0.1:9", f"run.output_dir={tmp_path}")
    with pytest.raises(TrackingError, match="unreachable.*tracking"):
        run_training(cfg, use_ray=False, name="x", console=False)
    assert not os.path.exists(os.path.join(tmp_path, "runs", "x", "metrics.jsonl"))


# ---------------------------------------------------------------------------------------------------------------
# Ray Train + FSDP2 (2 gloo workers on the session's local Ray)
# ---------------------------------------------------------------------------------------------------------------


def _copy_cache(shared_out, dst):
    for sub in ("tokenizers", "stores"):
        if os.path.isdir(os.path.join(shared_out, sub)):
            shutil.copytree(os.path.join(shared_out, sub), os.path.join(dst, sub), dirs_exist_ok=True)


def test_ray_runs_read_the_plain_loops_windows_and_match_it_across_a_failure_and_a_resize(shared_out, tmp_path,
                                                                                         ray_session, monkeypatch):
    """The Ray path against the plain loop of the same config, on the default data path (token store, every rank
    reading its own windows), in two Ray runs:
    - 2 FSDP workers (gloo, micro-batches of 1) ended at step 6 by a deterministic error, once, with retries left;
    - the same run started again by name with 3 workers: Ray Train resumes from the step-4 checkpoint, DCP reshards
      2 -> 3, and the batch of 4 splits unevenly (rows 0, 1, 2-3 on ranks 0, 1, 2).
    Per-step digests of the windows the workers trained on equal the plain loop's (none lost, none read twice);
    every step's loss, the validation loss and the step-4 weights equal the plain loop's up to float reduction
    order (the loss uses global per-slot counts, so neither the world size nor the shard sizes change it).
    Covered elsewhere: 3 -> 2 -> 3, killed and hung (SIGSTOP) workers, driver SIGTERM/SIGKILL (tests/test_elastic.py),
    MoE over two ranks (tests/test_moe.py)."""
    from mlflow.tracking import MlflowClient

    from pipeline.errors import DataError
    from pipeline.runner import run_training
    from pipeline.train.checkpoint import load_model_state
    from pipeline.train.loop import read_digests

    out = str(tmp_path)
    _copy_cache(shared_out, out)
    over = [f"run.output_dir={out}", "data.bag_size=4", "train.switch_fraction=0.3"]
    monkeypatch.setenv("TST_WINDOW_DIGESTS", str(tmp_path / "dg-plain"))
    plain_summary, plain, _ = run_local(make_cfg(shared_out, *over), str(tmp_path / "plain"))

    monkeypatch.setenv("TST_WINDOW_DIGESTS", str(tmp_path / "dg-ray"))
    # a deterministic error (a DataError at step 6 on rank 0, raised at every attempt): the run ends once, with
    # that error, although retries are left (a retry would repeat it); MLflow records the run FAILED
    marker = tmp_path / "attempts"
    monkeypatch.setenv("TST_INJECT_FAILURE", f"6:0:fatal:{marker}")
    with pytest.raises(DataError, match="injected deterministic error at step 6 on rank 0"):
        run_training(make_cfg(shared_out, *over, "scaling.max_failures=3", "run.tracking=true"), use_ray=True,
                     name="ray", console=False)
    assert len(marker.read_text().splitlines()) == 1  # not retried
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tst").experiment_id])
    assert run.info.status == "FAILED"
    monkeypatch.delenv("TST_INJECT_FAILURE")
    summary = run_training(make_cfg(shared_out, *over, "scaling.num_workers=3", "scaling.cpus_per_worker=0.25",
                                    "run.tracking=true"), use_ray=True, name="ray", console=False)
    assert summary["step"] == 10 and summary["world_size"] == 3
    assert client.get_run(run.info.run_id).info.status == "FINISHED"  # the same MLflow run, resumed

    want, got = read_digests(str(tmp_path / "dg-plain")), read_digests(str(tmp_path / "dg-ray"))
    assert sorted(want) == list(range(10)) and all(sorted(r) == list(range(4)) for r in want.values())
    assert len({d for r in want.values() for d in r.values()}) == 40  # 40 distinct windows, none read twice
    assert got == want, "the Ray runs trained on other windows than the plain loop"

    by_step = {}
    for r in JsonlWriter(os.path.join(out, "runs", "ray", "metrics.jsonl")).read():
        if "train_loss" in r:
            by_step.setdefault(r["step"], []).append((r["world_size"], r["train_loss"]))
    assert [w for w, _ in by_step[4]] == [2] and by_step[10][-1][0] == 3
    ref = losses(plain)
    assert sorted(by_step) == sorted(ref) == list(range(1, 11))
    for step, runs in by_step.items():
        assert runs[-1][1] == pytest.approx(ref[step], rel=1e-5), step
    assert summary["final_val_loss"] == pytest.approx(plain_summary["final_val_loss"], rel=1e-5)

    sd_plain, _ = load_model_state(str(tmp_path / "plain" / "checkpoints" / "step_00000004"))
    sd_ray, meta = load_model_state(os.path.join(out, "runs", "ray", "step_00000004"))
    assert meta["world_size"] == 2 and sd_plain.keys() == sd_ray.keys()
    for k in sd_plain:
        torch.testing.assert_close(sd_ray[k], sd_plain[k], rtol=1e-4, atol=1e-5, msg=k)

    # two worker-group starts (two runs), and none of the actors Ray Train 2.60 would start beside them for nothing:
    # a DatasetManager per start (the trainer has no `datasets`: pipeline.ray_internals.skip_unused_datasets_callback),
    # and, on this local Ray (pipeline.ray_internals.lean_local_trainer), a PlacementGroupCleaner per run. (The
    # AutoscalingCoordinator it no longer asks is checked below: Ray Data's own prepares in this session start one.)
    from ray.util.state import list_actors

    here = ray_session.get_runtime_context().gcs_address  # this session's Ray (others may run on the machine)
    names = set(a.class_name for a in list_actors(address=here, limit=10000, raise_on_missing_output=False))
    assert "RayTrainWorker" in names, sorted(names)
    assert not names & {"DatasetManager", "PlacementGroupCleaner"}, sorted(names)


def test_lean_local_trainer_hands_ray_train_no_cleaner_and_a_policy_that_asks_no_autoscaler(ray_session):
    """What `lean_local_trainer` changes in a real TorchTrainer's `fit` (Ray 2.60's own callbacks and policy): Ray's
    controller gets the default callbacks minus the placement-group cleaner, and a fixed-size policy that makes the
    same decision without a word to the AutoscalingCoordinator; an elastic policy is left as it is."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy, FixedScalingPolicy

    from pipeline import ray_internals

    def handed(num_workers):
        trainer = TorchTrainer(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=num_workers))
        seen = {}
        trainer._initialize_and_run_controller = lambda **kw: seen.update(kw) or type("R", (), {"error": None})()
        assert ray_internals.lean_local_trainer(trainer)
        trainer.fit()  # our wrapper, then the recorder in place of Ray's controller
        return seen

    seen = handed(2)
    assert not any(isinstance(cb, PlacementGroupCleanerCallback) for cb in seen["callbacks"])
    assert len(seen["callbacks"]) >= 2  # Ray's other default callbacks stay (backend set-up, accelerators, ...)
    policy = seen["scaling_policy"]
    assert isinstance(policy, FixedScalingPolicy) and type(policy) is not FixedScalingPolicy
    assert type(policy) is ray_internals.NoAutoscalerFixedPolicy  # found again by name: what the controller unpickles
    policy.after_controller_start(None)  # the base class would create the coordinator's client and ask it here
    assert policy._coordinator_client is None
    assert policy.make_decision_for_non_running_worker_group().num_workers == 2  # the same decision
    assert type(handed((1, 2))["scaling_policy"]) is ElasticScalingPolicy


def test_mlflow_records_params_metrics_artifacts_and_backfills(shared_out, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.runner import run_training
    from pipeline.report.tracking import MlflowTracker

    out = str(tmp_path)
    _copy_cache(shared_out, out)
    cfg = make_cfg(shared_out, "run.tracking=true", f"run.output_dir={out}", "train.steps=6", "data.bag_size=2",
                   "train.switch_fraction=0.5")
    summary = run_training(cfg, use_ray=False, name="tracked", console=False)
    uri = summary["tracking_uri"]
    assert uri == "sqlite:///" + os.path.join(out, "mlflow.db")
    client = MlflowClient(uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["train.switch_fraction"] == "0.5" and p["data.bag_size"] == "2" and p["train.steps"] == "6"
    assert run.data.tags["tst.world_size"] == "1" and len(run.data.tags["tst.git_commit"]) >= 7
    val = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in val] == [3, 5, 6] and all(m.value == m.value for m in val)
    sup = client.get_metric_history(run.info.run_id, "train_loss_superposition")
    assert [m.step for m in sup] == [1, 2, 3]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "config.yaml"} <= arts
    # what the data did: the store's counts in summary.json and MLflow (300 records of builtin:wiki, none skipped)
    d = summary["data"]
    assert d["records"] == 300 and d["documents"] + d["val_documents"] == 300 and d["skipped"]["empty"] == 0
    m = run.data.metrics
    assert m["data_documents"] == d["documents"] and m["data_train_tokens"] == d["train_tokens"]
    assert m["data_skipped_malformed_json"] == 0 and m["data_nul_documents"] == 0
    assert run.data.tags["tst.data_store"] == d["store"]
    # a server that was away: records only in metrics.jsonl are back-filled, once
    history = JsonlWriter(os.path.join(out, "runs", "tracked", "metrics.jsonl")).read()
    fresh = MlflowTracker(uri, "tst", "copy")
    assert fresh.backfill(history) == 6 and fresh.backfill(history) == 0
    assert [m.step for m in client.get_metric_history(fresh.run_id, "train_loss")] == [1, 2, 3, 4, 5, 6]


def test_mask_doc_boundary_mode_trains(shared_out, tmp_path):
    """doc_boundary=mask: sources hand (windows, doc_ids); targets across a document boundary are ignored."""
    from pipeline.train.loop import make_batch

    cfg = make_cfg(shared_out, "data.doc_boundary=mask", "data.bag_size=4", "train.switch_fraction=0.5",
                   "train.steps=4", "train.eval_every=2")
    summary, recs, tr = run_local(cfg, str(tmp_path))
    assert summary["status"] == "finished" and all(r["train_loss"] == r["train_loss"] for r in recs)
    windows, docs = tr.source.step_windows(0, 0, 1)
    _, masked = make_batch(windows, 4, 32, docs)
    _, crossed = make_batch(windows, 4, 32)
    assert (masked == -100).sum() > (crossed == -100).sum()  # some next-bag targets lay in the next document
    # the source's document ids against the tokens themselves: EOS ends its document, so the id changes right
    # after every EOS and nowhere else
    eos = load_tokenizer(cfg.data, cfg.run.output_dir).eos_id
    assert torch.equal(docs[:, 1:] != docs[:, :-1], windows[:, :-1] == eos)


def test_mask_doc_boundary_values_on_hand_built_windows(shared_out, tmp_path):
    """doc_boundary=mask on windows whose document boundary is placed by hand: the exact targets and ignore mask,
    and the training step's loss against a naive per-slot cross-entropy on those targets."""
    import torch.nn.functional as F

    from pipeline.train.loop import make_batch

    # s = 2, L = 3: window 10..17 (s*L + s tokens), documents 0 0 0 | 1 1 1 1 1. Bag j holds raw positions 2j, 2j+1
    # and predicts 2j+2, 2j+3; a target is ignored when its document is not that of bag j's last token (2j+1).
    # Bag 0 = (10, 11), last token in doc 0: target 12 (doc 0) kept, 13 (doc 1) ignored. Bag 1 = (12, 13) ends in
    # doc 1: 14, 15 kept. Bag 2 = (14, 15): 16, 17 kept.
    w = torch.arange(10, 18).view(1, 8)
    d = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    inputs, targets = make_batch(w, 2, 3, d)
    assert inputs.tolist() == [[[10, 11], [12, 13], [14, 15]]]
    assert targets.tolist() == [[[12, -100], [14, 15], [16, 17]]]
    assert make_batch(w, 2, 3)[1].tolist() == [[[12, 13], [14, 15], [16, 17]]]  # cross: nothing ignored
    # the boundary on a bag's edge (docs 0 0 0 0 | 1 ...): bag 1 = (12, 13) ends in doc 0, both its targets are
    # in doc 1; bag 2 ends in doc 1
    _, t2 = make_batch(w, 2, 3, torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]]))
    assert t2.tolist() == [[[12, 13], [-100, -100], [16, 17]]]
    # recovery (s = 1, L = 7): only the target right after the last token of document 0 is ignored
    _, t1 = make_batch(w, 1, 7, d)
    assert t1[..., 0].tolist() == [[11, 12, -100, 14, 15, 16, 17]]

    # One training step of the real trainer (s = 4, L = 32) on one window with a boundary at raw position 50:
    # bag 11 (positions 44-47, doc 0) predicts 48-51, of which 50 and 51 are in doc 1: exactly targets
    # (11, 2) and (11, 3) are ignored, so slots 2 and 3 average 31 bags and slots 0 and 1 all 32.
    cfg = make_cfg(shared_out, "data.doc_boundary=mask", "data.bag_size=4", "train.switch_fraction=0.5",
                   "train.steps=4", "train.global_batch_size=1", "scaling.num_workers=1")
    tok = load_tokenizer(cfg.data, cfg.run.output_dir)
    src = build_source(cfg, cfg.run.output_dir, mode="local", tokenizer=tok)
    tr = Trainer(cfg, src, LocalReporter(str(tmp_path), None, resume=False), vocab_size=tok.vocab_size)
    s, L = 4, 32
    g = torch.Generator().manual_seed(0)
    window = torch.randint(0, tok.vocab_size, (1, s * L + s), generator=g)
    docs = (torch.arange(s * L + s) >= 50).long().view(1, -1) + 7  # documents 7 | 8
    _, tgt = make_batch(window, s, L, docs)
    assert (tgt == -100).nonzero().tolist() == [[0, 11, 2], [0, 11, 3]]
    with torch.no_grad():
        tr.model.lm_head.weight.mul_(30)  # spread the logits: the targets' losses differ by nats, not by 1e-3
        # the two targets to be ignored get bag 11's least likely token, so that ignoring them or not moves the
        # loss by far more than the tolerance (bag 11's logits depend on positions < 48 only: causal)
        worst = tr.model(window[:, : s * L].view(1, L, s))[0, 11].argmin()
        window[0, 50:52] = worst
        logits = tr.model(window[:, : s * L].view(1, L, s)).double()[0]  # (L, V) before the step
    want = torch.stack([  # Listing 3 with uniform weights: mean over slots of each slot's mean CE
        F.cross_entropy(logits, window[0, s + i :: s][:L], reduction="none")[[j for j in range(L) if (j, i) not in
                                                                             {(11, 2), (11, 3)}]].mean()
        for i in range(s)]).mean()
    crossed = torch.stack([F.cross_entropy(logits, window[0, s + i :: s][:L]) for i in range(s)]).mean()
    loss, _ = tr.train_step(0, (window, docs))
    assert loss == pytest.approx(want.item(), rel=1e-5)
    assert crossed.item() - want.item() > 1e-2 * want.item()  # so the check above can see the two ignores


def test_stop_signal_is_a_name_until_the_driver_asks(ray_session):
    """The driver's SIGTERM reaches its ranks as a named actor made only then (pipeline.train.ray_train.StopSignal):
    nothing runs before, a rank's pickled copy carries only the name, and a second request changes nothing."""
    import pickle
    import time

    from pipeline.train.ray_train import StopSignal

    sig = StopSignal()
    rank_copy = pickle.loads(pickle.dumps(sig))
    assert rank_copy.name == sig.name and rank_copy._actor is None
    assert not rank_copy.requested() and not StopSignal().requested()
    sig.request()
    deadline = time.monotonic() + 60
    while not rank_copy.requested():
        assert time.monotonic() < deadline, "the stop request never became visible"
        time.sleep(0.1)
    sig.request()  # idempotent: one actor
    assert StopSignal().requested() is False  # another driver's name: not asked
    ray_session.kill(ray_session.get_actor(sig.name, namespace=StopSignal.NAMESPACE))


def test_console_lines_reach_rays_unbuffered_stdout_in_one_write(tmp_path):
    """Under Ray a worker's stdout flushes every write (ray._private.utils.Unbuffered), and Ray's log monitor reads
    a line's text and a newline written apart as two lines (an empty `(TrainController ...)` line on the console):
    every console line of the sink must be a single write that ends in its newline."""
    from ray._private.utils import Unbuffered

    class Writes:
        def __init__(self):
            self.calls = []

        def write(self, s):
            self.calls.append(s)
            return len(s)

        def flush(self):
            pass

    raw = Writes()
    sink = MetricsSink(str(tmp_path), 10, console=True, stream=Unbuffered(raw))
    sink.log({"step": 5, "phase": "recovery", "bag_size": 1, "train_loss": 6.0, "lr": 1e-3, "tokens_per_s": 100.0})
    sink.message("[tst] a message")
    assert len(raw.calls) == 2 and all(c.endswith("\n") and c.count("\n") == 1 for c in raw.calls), raw.calls
    assert raw.calls[0].startswith("step  5/10 ") and raw.calls[1] == "[tst] a message\n"
