"""Why does recovery start slowly? Adam's second moments at the switch, against the gradients that follow it.

AdamW's update is m_hat / (sqrt(v_hat) + eps): a gradient much larger than what `v` has seen moves the weights by
more than `lr` per element until `v` catches up (beta2 = 0.95: ~20-60 steps). In superposition the gradients come
from a multi-hot loss whose target is spread over s tokens; at the switch the next-token gradient may be larger,
so the first recovery steps would act like a transient higher learning rate. This script loads a run's switch
checkpoint (model + AdamW state, written by the loop at `switch_step`), computes the gradient of one
superposition batch (step switch-1, bags of s) and of one recovery batch (step switch), and prints, per
parameter group, rms(g / (sqrt(v_hat) + eps)) for both: ~1 means the gradient is what Adam expects; k >> 1 means
the first steps are k times larger than steady-state ones. (Measured in docs/results.md: at laptop scale the
mismatch is real, 3-9x for the hidden weights, but correcting it does not make recovery faster.)

With --intervene, it then tests the explanation: it writes a branch run `<run>-<intervention>` whose switch
checkpoint has its AdamW state changed, and trains it to the end with the run's own config, data and schedule
(the Ray-free loop), so its validation curve can be set beside the run's:
  refresh_v        keep the weights and first moments, set v to the recovery gradient's square (the mean over
                   --batches recovery batches, i.e. what v would be had recovery gradients been seen all along)
  reset_optimizer  zero both moments and the step count (the paper's ablation, which hurt at 3B: 2.303 vs 2.214)
  reinit           also start the weights afresh (the run's own seed): what recovery does with phase 1 thrown
                   away, i.e. the value of the superposition phase measured on the same data and LR schedule
These are diagnostics, not part of TST: the paper carries the optimizer state across the switch, and so do we.

    python bench/switch_diag.py outputs/speedup/runs/followup_r_lr1e-3-s6-r0.1
    python bench/switch_diag.py outputs/speedup/runs/followup_r_lr1e-3-s6-r0.1 --intervene refresh_v
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch


def group_of(name: str) -> str:
    for key, label in (("embed", "embedding"), ("norm", "norms"), ("attention.", "attention"),
                       ("feed_forward", "mlp"), ("output", "lm_head"), ("lm_head", "lm_head")):
        if key in name:
            return label
    return "other"


def main(argv: list[str] | None = None) -> dict:
    """Prints the table; returns {group: (superposition rms, recovery rms)} and the branch's summary if any."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--batches", type=int, default=4, help="batches averaged on each side of the switch")
    ap.add_argument("--intervene", choices=["refresh_v", "reset_optimizer", "reinit"],
                    help="also train a branch from the switch checkpoint with this change (see above)")
    ap.add_argument("--json", metavar="PATH", help="also write the returned figures (and the branch's summary) here")
    a = ap.parse_args(argv)

    from pipeline.train.checkpoint import load_checkpoint
    from pipeline.config import load_config
    from pipeline.data import build_source
    from pipeline.train.loop import build_model, build_optimizer, make_batch

    cfg = load_config(os.path.join(a.run_dir, "config.yaml"))
    torch.set_num_threads(cfg.train.threads or 1)
    from pipeline.data.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.data, cfg.run.output_dir)
    src = build_source(cfg, cfg.run.output_dir, tokenizer=tok)
    sw = src.plan.switch_step
    if sw <= 0:
        sys.exit("this run has no superposition phase (bag_size 1 or switch_fraction 0)")
    ckpt = os.path.join(a.run_dir, "checkpoints", f"step_{sw:08d}")
    if not os.path.isdir(ckpt):
        sys.exit(f"no switch checkpoint {ckpt}: the loop writes one at switch_step, and it was pruned; "
                 "rerun the run with a larger train.keep_checkpoints")
    vocab = tok.vocab_size
    model, _ = build_model(cfg, vocab, torch.device("cpu"))
    opt = build_optimizer(cfg, model)
    load_checkpoint(ckpt, model, opt)
    beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]

    def grads(step: int) -> dict[str, torch.Tensor]:
        s = src.plan.bag_size_at(step)
        w = src.step_windows(step)
        w, docs = w if isinstance(w, tuple) else (w, None)  # doc_ids with data.doc_boundary = "mask"
        inputs, targets = make_batch(w, s, cfg.data.seq_len, docs)  # (b, L[, s]), (b, L, s)
        counts = (targets != -100).sum(dim=(0, 1)).float()
        model.zero_grad(set_to_none=True)
        loss = model(inputs, targets, loss_weights=cfg.train.loss_weights, slot_counts=counts)
        loss.backward()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    sides = {"superposition": range(sw - a.batches, sw), "recovery": range(sw, sw + a.batches)}
    stats: dict[str, dict[str, list[float]]] = {}
    rec_sq = {n: torch.zeros_like(p) for n, p in model.named_parameters()}  # mean recovery g^2
    for side, steps in sides.items():
        for step in steps:
            g = grads(step)
            if side == "recovery":
                for n in rec_sq:
                    rec_sq[n] += g[n].pow(2) / len(steps)
            for n, p in model.named_parameters():
                st = opt.state[p]
                t = float(st["step"])
                v_hat = st["exp_avg_sq"] / (1 - beta2 ** t)
                r = (g[n] / (v_hat.sqrt() + eps)).pow(2).mean().item()
                stats.setdefault(group_of(n), {}).setdefault(side, []).append(r)
    print(f"run {a.run_dir}: switch at step {sw} (s={cfg.data.bag_size}), {a.batches} batches each side")
    print(f"{'group':<10} {'rms g/sqrt(v), superposition':>30} {'rms g/sqrt(v), recovery':>25} {'ratio':>7}")
    table = {}
    for grp, d in stats.items():
        sup = (sum(d['superposition']) / len(d['superposition'])) ** 0.5
        rec = (sum(d['recovery']) / len(d['recovery'])) ** 0.5
        table[grp] = (sup, rec)
        print(f"{grp:<10} {sup:>30.3f} {rec:>25.3f} {rec / sup:>7.2f}")
    out = {"rms": table, "switch_step": sw}
    if a.intervene:
        out["branch"] = branch(a, cfg, ckpt, model, opt, rec_sq, vocab)
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return out


def branch(a, cfg, ckpt: str, model, opt, rec_sq: dict, vocab: int) -> dict:
    """A run folder `<run>-<intervention>` holding the modified switch checkpoint, trained to the end."""
    import json
    import shutil

    from pipeline.study.branches import copy_history
    from pipeline.train.checkpoint import read_meta, save_checkpoint
    from pipeline.runner import run_training

    from pipeline.train.loop import build_model

    if a.intervene == "reinit":  # the initial weights of the run (same seed as its step 0)
        fresh, _ = build_model(cfg, vocab, torch.device("cpu"))
        model.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        for n, p in model.named_parameters():
            st = opt.state[p]
            if a.intervene in ("reset_optimizer", "reinit"):
                st["exp_avg"].zero_()
                st["exp_avg_sq"].zero_()
                st["step"].zero_()
            else:  # refresh_v: v_hat equal to the recovery gradients' mean square (undo the bias correction)
                t = float(st["step"])
                st["exp_avg_sq"].copy_(rec_sq[n] * (1 - opt.param_groups[0]["betas"][1] ** t))
    run_dir = os.path.abspath(a.run_dir.rstrip("/"))
    name = f"{os.path.basename(run_dir)}-{a.intervene}"
    dst = os.path.join(os.path.dirname(run_dir), name)
    shutil.rmtree(dst, ignore_errors=True)
    meta = read_meta(ckpt)
    save_checkpoint(os.path.join(dst, "checkpoints", os.path.basename(ckpt)), model, opt, meta, rank=0,
                    tokenizer_path=os.path.join(ckpt, "tokenizer.json"))
    copy_history(run_dir, dst, meta["step"])  # the shared history up to the switch, like a decay branch's
    with open(os.path.join(dst, "BRANCH.json"), "w") as f:
        json.dump({"branched_from": run_dir, "checkpoint": ckpt, "step": meta["step"],
                   "intervention": a.intervene}, f, indent=1)
    print(f"branch {name}: {a.intervene} at step {meta['step']}, training to step {cfg.train.steps}", flush=True)
    cfg.run.tracking = False
    summary = run_training(cfg, use_ray=False, name=name, console=True)
    print(f"branch {name}: final val_loss {summary.get('final_val_loss')}")
    return summary


if __name__ == "__main__":
    main()
