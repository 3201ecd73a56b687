"""Measured runs on a token store folder, and an equal-FLOPs pair of them compared from their logged records:
bench/gpu_check.py's train and compare sections (no yaml, no Ray, no MLflow: a torch-only GPU machine).

`train_run` trains one run through the runner's Ray-free driver (`pipeline.runner.train_in_process`) with FSDP2 on
a one-rank process group and no checkpoint writes, and returns a run dict: `records` (every record the loop
logged), `summary` (its final summary), `steps`, `global_batch_size`, `seq_len`, `bag_size`, `switch_fraction`,
`switch_step`, `wall_s`, `params`, `flops_per_position` and the rest of its settings. `compare_pair` compares a
baseline and a TST run dict of the same T, batch, L, seed and schedule: `pipeline.report.curves.compute_comparison`'s
figures (one baseline: its whole validation curve), plus the validation-loss difference at every shared
evaluation step.
"""

from __future__ import annotations

METRICS = ("val_loss", "elapsed_s", "flops", "raw_tokens")


def train_run(store: str, data_vocab: int, *, device, out_dir: str, name: str, preset: str, seq_len: int, batch: int,
              steps: int, switch_fraction: float, bag_size: int, compile: bool, log_every: int, eval_every: int,
              lr: float, warmup: int, val_windows: int, seed: int = 0, threads=None, console: bool = False) -> dict:
    """One run on the store folder `store` (whose tokenizer has `data_vocab` ids; the model takes the preset's
    vocabulary when it covers them), in `<out_dir>/runs/<name>`: bf16 on CUDA, float32 on CPU, WSD with a 10 %
    decay, FSDP2 on one rank, checkpoint writes skipped (they would pollute the throughput intervals)."""
    import time

    import torch
    import torch.distributed as dist

    from pipeline.config import Config
    from pipeline.model.transformer import model_summary, reference_vocab
    from pipeline.runner import train_in_process
    from pipeline.train.parallel import init_single_process_group

    from tst_ops.bench import free_memory

    init_single_process_group(device)
    cfg = Config()
    cfg.model.preset, cfg.model.vocab_size = preset, reference_vocab(preset, data_vocab)
    d = cfg.data
    d.source, d.seq_len, d.bag_size, d.val_windows = store, seq_len, bag_size, val_windows
    t = cfg.train
    t.steps, t.switch_fraction, t.global_batch_size, t.micro_batch_size = steps, switch_fraction, batch, None
    t.lr, t.warmup_steps, t.decay_fraction, t.seed = lr, warmup, 0.1, seed
    t.dtype = "bfloat16" if device.type == "cuda" else "float32"
    t.compile, t.log_every, t.eval_every, t.checkpoint_every = compile, log_every, eval_every, 10**9
    t.threads = threads if device.type == "cpu" else None
    cfg.scaling.num_workers, cfg.scaling.use_gpu = 1, device.type == "cuda"
    cfg.run.output_dir, cfg.run.tracking, cfg.run.resume = out_dir, False, False
    model = model_summary(cfg.model, data_vocab, seq_len)
    if device.type == "cuda":
        free_memory(device)
        torch.cuda.reset_peak_memory_stats(device)
    records: list[dict] = []
    t0 = time.perf_counter()
    summary = train_in_process(cfg, name, console=console, device=device, checkpoints=False,
                               on_metrics=records.append)
    out = {
        "name": name, "preset": preset, "vocab_size": model["vocab_size"], "params": model["params"],
        "flops_per_position": model["flops_per_position"], "seq_len": seq_len, "global_batch_size": batch,
        "steps": steps, "switch_step": summary["switch_step"], "bag_size": bag_size,
        "switch_fraction": switch_fraction, "compile": compile, "dtype": t.dtype, "fsdp": dist.is_initialized(),
        "world_size": summary["world_size"], "data_store": (summary.get("data") or {}).get("store"),
        "wall_s": time.perf_counter() - t0, "records": records, "summary": summary,
    }
    if device.type == "cuda":
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    if compile:
        torch._dynamo.reset()
    free_memory(device)
    return out


def run_curves(name: str, run: dict):
    """The `RunCurves` of a run dict (see the module docstring), with the params compare reads."""
    from pipeline.report.runs import RunCurves

    metrics: dict[str, list] = {}
    for rec in run["records"]:
        for k in METRICS:
            if rec.get(k) is not None:
                metrics.setdefault(k, []).append((int(rec["step"]), float(rec[k])))
    params = {"train.steps": run["steps"], "train.switch_fraction": run["switch_fraction"],
              "data.bag_size": run["bag_size"], "train.global_batch_size": run["global_batch_size"],
              "data.seq_len": run["seq_len"]}
    return RunCurves(name=name, source="folder", metrics=metrics, params=params,
                     phases=[(int(x["step"]), x["phase"]) for x in run["records"] if "phase" in x])


def _run_figures(run: dict) -> dict:
    recs = run["records"]
    return {
        "final_val_loss": run["summary"]["final_val_loss"], "status": run["summary"]["status"],
        "raw_tokens": run["summary"]["raw_tokens"], "epochs": run["summary"]["epochs"],
        "wall_s": run["wall_s"], "switch_step": run["switch_step"],
        "val_curve": [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None],
        "train_curve": [(r["step"], r["train_loss"], r["phase"]) for r in recs if "train_loss" in r],
    }


def compare_pair(base: dict, tst: dict) -> dict:
    """Final losses, the equal-step difference (baseline minus TST at TST's final step; positive = TST better),
    the iso-loss figures, the difference at every evaluation step both logged, and the FLOPs of one run."""
    from pipeline.report.curves import compute_comparison

    res = compute_comparison(run_curves("tst", tst), [run_curves("baseline", base)])
    b, t = _run_figures(base), _run_figures(tst)
    bv, tv = dict(b["val_curve"]), dict(t["val_curve"])
    return {
        "baseline": b, "tst": t,
        "final_val_loss_baseline": b["final_val_loss"], "final_val_loss_tst": t["final_val_loss"],
        "equal_step_diff_nats": res["equal_step"]["diff_nats"],
        "val_loss_diff_by_step": [(st, bv[st] - tv[st]) for st in sorted(set(bv) & set(tv))],
        "iso_loss_speedup": res["speedup"],
        "comparison": {k: res[k] for k in ("target_loss", "mode", "equal_step")},
        "flops_per_run": float(tst["flops_per_position"]) * tst["global_batch_size"] * tst["seq_len"] * tst["steps"],
    }
