"""The two-phase TST training loop, runnable and tested without Ray.

One function, `train()`, runs a whole run (or its remainder after a resume) on one rank. The Ray layer
(`pipeline.train.ray_train`) calls the very same function inside each `TorchTrainer` worker; it only supplies a
different `Reporter` (where metrics and checkpoints go) and an initialised process group.

A step (paper, Listing 1, with equal FLOPs per step in both phases):
  superposition (step < switch_step): windows (b, s*L + s) -> inputs folded into bags (b, L, s), targets the
      next bag of every bag (b, L, s) (tst_ops.next_bag_targets); loss = multi-hot CE.
  recovery: windows (b, L + 1) -> inputs (b, L), targets (b, L, 1); loss = ordinary next-token CE.
The same parameters, AdamW state and warmup-stable-decay LR run on across the switch.

The loss of a step is the loss of the GLOBAL batch (design notes): per-slot valid-target counts are summed over
all ranks first, each micro-batch contributes `sum CE / global count`, and the contributions add up, so the
loss and the update do not depend on the worker count or on gradient accumulation. FSDP2 averages gradients
over ranks, so each rank's backward is scaled by the world size to turn that mean back into the sum.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol

import torch
import torch.distributed as dist

from pipeline.train.checkpoint import CHECKPOINT_FORMAT
from pipeline.config import Config
from pipeline.train.metrics import StepTimer, machine_info, peak_flops_for, say

PHASES = ("superposition", "recovery")


class Reporter(Protocol):
    """Where a rank's metrics and checkpoints go: `LocalReporter` here, `RayReporter` under Ray Train."""

    is_chief: bool  # the rank whose metrics are recorded

    def staging_dir(self, step: int) -> str: ...

    def report(self, metrics: Optional[dict], checkpoint_staging: Optional[str], step: int) -> None: ...

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Optional[str]]: ...

    def last_good_checkpoint(self) -> Optional[str]: ...


@dataclass
class RunState:
    step: int = 0  # optimizer steps completed
    elapsed_s: float = 0.0  # training wall-clock before this process (resume)


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.train.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.train.dtype]


def build_model(cfg: Config, vocab_size: int, device: torch.device):
    """The plain model, initialised identically on every rank from the run's seed."""
    from pipeline.model.transformer import Transformer, resolve_model_config

    mcfg = resolve_model_config(cfg.model, vocab_size)
    torch.manual_seed(cfg.train.seed)
    with torch.device(device):
        model = Transformer(mcfg)
    model.init_weights()
    return model, mcfg


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (paper: beta 0.9/0.95); no weight decay on norms (1-D parameters)."""
    t = cfg.train
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, foreach=True)


def make_batch(windows: torch.Tensor, bag_size: int, seq_len: int, doc_ids: Optional[torch.Tensor] = None):
    """Raw windows (b, s*L + s) -> model inputs and next-bag targets.

    inputs: (b, L, s) bags when s > 1 (paper Listing 1: reshape (B, s*L) -> (B, L, s)), else (b, L);
    targets: (b, L, s) (tst_ops.next_bag_targets, paper Listing 3), (b, L, 1) in recovery.
    """
    from tst_ops import fold_bags, next_bag_targets

    s, L = bag_size, seq_len
    if windows.shape[1] != s * L + s:
        raise ValueError(f"expected windows of {s * L + s} tokens for s={s}, L={L}; got {tuple(windows.shape)}")
    windows = windows.long()
    raw = windows[:, : s * L]  # (b, s*L)
    inputs = fold_bags(raw, s) if s > 1 else raw  # (b, L, s) or (b, L)
    targets = next_bag_targets(windows, s, doc_ids=doc_ids)  # (b, L, s)
    return inputs, targets


def _split_doc_ids(batch):
    """Sources return windows, or (windows, doc_ids) when the document-boundary policy is "mask"."""
    if isinstance(batch, (tuple, list)):
        return batch[0], batch[1]
    return batch, None


class Trainer:
    """State of one rank's run: model, optimizer, data source, schedule. `run()` trains to the end."""

    def __init__(self, cfg: Config, source, reporter: Reporter, *, vocab_size: int,
                 device: Optional[torch.device] = None, tokenizer_path: Optional[str] = None,
                 checkpoints: bool = True):
        from tst_ops import schedule

        self.cfg = cfg
        # checkpoints=False: the steps that would write one report their metrics only (a throughput measurement,
        # bench/gpu_check.py, whose intervals must not include disk I/O; such a run cannot be resumed)
        self.checkpoints = checkpoints
        self.source = source
        self.reporter = reporter
        self.tokenizer_path = tokenizer_path
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.device = device or torch.device("cpu")
        if cfg.train.threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.train.threads)
        t = cfg.train
        self.T = t.steps
        self.switch_step = schedule.switch_step(t.steps, t.switch_fraction) if cfg.data.bag_size > 1 else 0
        self.schedule = schedule
        with warnings.catch_warnings():
            if self.rank != 0:  # one warning per run, not one per worker
                warnings.simplefilter("ignore")
            schedule.check_schedule(t.steps, t.switch_fraction, cfg.data.bag_size, t.warmup_steps, t.decay_fraction)

        self.dtype = resolve_dtype(cfg, self.device)
        model, self.model_cfg = build_model(cfg, vocab_size, self.device)
        self.flops_per_position = model.flops_per_position(cfg.data.seq_len)  # design notes' FLOP count
        from pipeline.train.parallel import parallelize

        use_fsdp = self.distributed
        self.autocast = self.dtype != torch.float32 and not use_fsdp
        self.model = parallelize(
            model, distributed=use_fsdp, activation_checkpointing=t.activation_checkpointing,
            compile=t.compile, param_dtype=self.dtype if (use_fsdp and self.dtype != torch.float32) else None)
        self.optimizer = build_optimizer(cfg, self.model)
        self.state = RunState()
        self.peak_flops = peak_flops_for(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        # Rows per rank: B/W, or uneven when W does not divide B (plan.rank_rows); every rank runs the same number
        # of micro-batches (n_micro, from the largest share), so collectives line up; validate() ensures even the
        # smallest share fills every micro-batch with at least one row.
        self.first_row = self.rank * t.global_batch_size // self.world_size
        self.per_rank = -(-t.global_batch_size // self.world_size)  # the largest share
        self.micro = t.micro_batch_size or self.per_rank
        self.n_micro = -(-self.per_rank // self.micro)
        self.moe = bool(self.model_cfg.num_experts)  # MoE: aux loss and expert load per logging interval
        self.moe_step: Optional[dict] = None  # the last step's {"aux", "z", "counts" (n_moe, E) global}
        self.stop_agreed = False  # set by train_step: every rank agreed to stop after this step (a SIGTERM)
        self._moe_interval: list[dict] = []  # moe_step of every step since the last log

    # -- schedule ---------------------------------------------------------------------------------------------
    def bag_size_at(self, step: int) -> int:
        return self.cfg.data.bag_size if step < self.switch_step else 1

    def phase_at(self, step: int) -> str:
        return PHASES[0] if step < self.switch_step else PHASES[1]

    def lr_at(self, step: int) -> float:
        t = self.cfg.train
        return self.schedule.wsd_lr(step, t.steps, t.lr, t.warmup_steps, t.decay_fraction, t.min_lr_ratio)

    def raw_tokens_before(self, step: int) -> int:
        t = self.cfg.train
        return self.schedule.raw_tokens_before(step, t.steps, t.switch_fraction if self.switch_step else 0.0,
                                               self.cfg.data.bag_size, t.global_batch_size * self.cfg.data.seq_len)

    # -- checkpoint -------------------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {
            "step": self.state.step,
            "phase": self.phase_at(self.state.step) if self.state.step < self.T else "done",
            "phase_of_last_step": self.phase_at(self.state.step - 1) if self.state.step else None,
            "switch_step": self.switch_step,
            "total_steps": self.T,
            "data_position": self.raw_tokens_before(self.state.step),
            "elapsed_s": self.state.elapsed_s + (time.perf_counter() - self._t_start),
            "world_size": self.world_size,
            "config": _resolved_config(self.cfg, self.model_cfg),
            "tokenizer": "tokenizer.json",
            "model_params": sum(p.numel() for p in self.model.parameters()),
            "data_store": getattr(self.source, "store_id", None),  # the tokenized data this run reads
            "stream": self.source.identity() if hasattr(self.source, "identity") else None,  # what step t reads
            "format_version": CHECKPOINT_FORMAT,
        }

    def save(self, metrics: Optional[dict]) -> None:
        from pipeline.train.checkpoint import save_checkpoint

        if not self.checkpoints:
            self.reporter.report(metrics, None, self.state.step)
            return
        staging = self.reporter.staging_dir(self.state.step)
        save_checkpoint(staging, self.model, self.optimizer, self.meta(), self.rank, self.tokenizer_path)
        if self.distributed:
            dist.barrier()
        self.reporter.report(metrics, staging, self.state.step)

    def maybe_resume(self) -> None:
        from pipeline.train.checkpoint import check_resume, load_checkpoint, read_meta, restore_rng

        with self.reporter.latest_checkpoint() as path:
            if path is None:
                return
            saved = read_meta(path)  # refuse another run's checkpoint before loading (shapes may differ)
            check_resume(self.cfg, saved, self.source)
            meta = load_checkpoint(path, self.model, self.optimizer)
            restore_rng(path, self.rank, self.cfg.train.seed, int(meta["step"]))
        self.state.step = int(meta["step"])
        self.state.elapsed_s = float(meta.get("elapsed_s", 0.0))
        if self.rank == 0:
            say(f"[tst] resumed from {path} at step {self.state.step}/{self.T} "
                f"(data position {meta.get('data_position')}, saved by {meta.get('world_size')} workers, "
                f"now {self.world_size})")

    # -- evaluation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Next-token loss on held-out windows (the model is always an ordinary LM, in both phases)."""
        val, val_docs = _split_doc_ids(self.source.val_windows())  # (N, L + 1)
        n = val.shape[0]
        if n == 0:
            return float("nan")
        # Every held-out window counts, whatever the world size: ranks take ceil(N/W) windows each and the last
        # ones are padded with windows whose targets are all ignored (they add 0 to the loss and to the count), so
        # val_loss is the same set and the same value when an elastic run resizes.
        per = -(-n // self.world_size)
        L = self.cfg.data.seq_len
        lo, hi = min(self.rank * per, n), min((self.rank + 1) * per, n)
        mine = val[lo:hi]
        mine_docs = None if val_docs is None else val_docs[lo:hi]
        inputs_all, targets_all = make_batch(mine, 1, L, mine_docs)  # (k, L), (k, L, 1)
        pad = per - (hi - lo)
        if pad:
            inputs_all = torch.cat([inputs_all, inputs_all.new_zeros((pad, L))])
            targets_all = torch.cat([targets_all, targets_all.new_full((pad, L, 1), -100)])
        inputs_all, targets_all = inputs_all.to(self.device), targets_all.to(self.device)
        count = (targets_all != -100).sum().to(torch.float32).reshape(1)
        _all_reduce(count)  # the global count of valid held-out targets
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        self.model.eval()
        for i in range(0, per, self.micro):
            with self._autocast():
                total += self.model(inputs_all[i:i + self.micro], targets_all[i:i + self.micro], slot_counts=count).float()
        self.model.train()
        return float(_all_reduce(total))

    def _autocast(self):
        if self.autocast:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    # -- one optimizer step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _router_counts(self, inputs: torch.Tensor, n_micro: int) -> torch.Tensor:
        """The routing pre-pass of an MoE step with gradient accumulation (train.moe_aux_prepass): a no-grad
        forward of this rank's micro-batches, as the step will run them, up to the last layer; returns the expert
        counts (n_moe, E) summed over them and over ranks, so the load-balancing loss's token fractions are the
        global batch's before any micro-batch's backward (pipeline/model/moe.py)."""
        counts = 0
        for m in range(n_micro):
            with self._autocast():
                counts = counts + self.model(inputs[m * self.micro:(m + 1) * self.micro], router_counts_only=True)
        return _all_reduce(counts)

    def train_step(self, step: int, windows, stop_vote: bool = False) -> tuple[float, float]:
        """Forward/backward over this rank's micro-batches, then one AdamW step. Returns (loss, grad norm).

        `windows` is (b, s*L + s) token ids, or `(windows, doc_ids)` with data.doc_boundary = "mask".
        `stop_vote` (rank 0: a stop was asked for) rides on the step's finiteness all-reduce, so every rank agrees
        on the step to stop at without a collective of its own; the agreement is left in `self.stop_agreed`."""
        s, L = self.bag_size_at(step), self.cfg.data.seq_len
        windows, doc_ids = _split_doc_ids(windows)
        inputs, targets = make_batch(windows.to(self.device, non_blocking=True), s, L,
                                     None if doc_ids is None else doc_ids.to(self.device))  # (b, L[, s]), (b, L, s)
        slot_counts = (targets != -100).sum(dim=(0, 1)).to(torch.float32)  # (s,) valid targets per slot
        _all_reduce(slot_counts)  # global batch counts (design notes)
        weights = self.cfg.train.loss_weights
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        moe_kw, moe_sums, step_counts = {}, None, None
        n_micro = self.n_micro  # the same on every rank; this rank's last micro-batch may be shorter
        if self.moe:  # the aux loss over the global batch, like slot_counts (pipeline/model/moe.py)
            moe_kw = dict(router_counts_reduce=_all_reduce, router_tokens=float(self.cfg.train.global_batch_size * L))
            moe_sums = [torch.zeros((), device=self.device), torch.zeros((), device=self.device), 0.0]  # aux, z, counts
            if n_micro > 1 and self.cfg.train.moe_aux_prepass:  # every rank has the same n_micro: all or none
                step_counts = self._router_counts(inputs, n_micro)  # (n_moe, E) over ranks and micro-batches
                moe_kw = dict(router_counts=step_counts, router_tokens=moe_kw["router_tokens"])
        from pipeline.train.parallel import clip_grad_norm, set_gradient_sync

        for m in range(n_micro):
            sl = slice(m * self.micro, (m + 1) * self.micro)
            set_gradient_sync(self.model, m == n_micro - 1)
            with self._autocast():
                contrib = self.model(inputs[sl], targets[sl], loss_weights=weights, slot_counts=slot_counts,
                                     fused_chunk=self.cfg.train.fused_loss_chunk, **moe_kw)
            (contrib * self.world_size).backward()  # FSDP averages over ranks; the global loss is a sum
            if moe_sums is None:
                loss_sum += contrib.detach().float()
            else:  # log the LM loss alone; aux and z separately. counts are already summed over ranks
                parts = self.model.moe_last
                loss_sum += parts["lm"].float()
                moe_sums = [moe_sums[0] + parts["aux"], moe_sums[1] + parts["z"], moe_sums[2] + parts["counts"]]
        loss = _all_reduce(loss_sum)
        if moe_sums is not None:
            aux_z = _all_reduce(torch.stack(moe_sums[:2]))
            counts = moe_sums[2] if step_counts is None else step_counts  # (each micro-batch got the step's counts)
            self.moe_step = {"aux": float(aux_z[0]), "z": float(aux_z[1]), "counts": counts.cpu()}
        grad_norm = clip_grad_norm(self.model, self.cfg.train.grad_clip)
        flags = torch.tensor([0.0 if (torch.isfinite(loss) and torch.isfinite(grad_norm)) else 1.0,
                              1.0 if stop_vote else 0.0], device=self.device)  # (bad, stop)
        flags = _all_reduce(flags, dist.ReduceOp.MAX if self.distributed else None).tolist()
        self.stop_agreed = flags[1] > 0
        if flags[0] > 0:
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan"), float("nan")
        lr = self.lr_at(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss), float(grad_norm)

    def _stop_vote(self) -> bool:
        """Rank 0's view: has a stop been asked for (SIGTERM of the driver: a spot notice, `kill`)? The ranks agree
        on it inside `train_step`'s all-reduce."""
        ask = getattr(self.reporter, "stop_requested", None)
        return bool(ask()) if (ask is not None and self.rank == 0) else False

    # -- the run --------------------------------------------------------------------------------------------
    def run(self) -> dict:
        self._t_start = time.perf_counter()
        self.maybe_resume()
        t = self.cfg.train
        start = self.state.step
        timer = StepTimer()
        losses: list[tuple[int, float]] = []
        val_loss = None
        status = "finished"
        it: Iterator = self.source.iter_steps(start, self.rank, self.world_size)
        step = start
        while step < self.T:
            t0 = time.perf_counter()
            got_step, windows = next(it)
            wait = time.perf_counter() - t0
            if got_step != step:
                raise RuntimeError(f"data source out of order: expected step {step}, got {got_step}")
            s = self.bag_size_at(step)
            _maybe_record_digests(step, windows, self.first_row)
            _maybe_inject_failure(step, self.rank)
            _maybe_pace()
            loss, gnorm = self.train_step(step, windows, stop_vote=self._stop_vote())
            if self.moe_step is not None:
                self._moe_interval.append(self.moe_step)
            done = step + 1
            self.state.step = done
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            positions = t.global_batch_size * self.cfg.data.seq_len
            timer.add(1, positions * s, positions, wait, time.perf_counter() - t0)
            if not math.isfinite(loss):
                status = "nonfinite"
                break
            losses.append((done, loss))
            is_switch = done == self.switch_step and 0 < self.switch_step < self.T
            is_last = done == self.T
            do_eval = done % t.eval_every == 0 or is_switch or is_last
            do_log = done % t.log_every == 0 or do_eval
            stop = self.stop_agreed and not is_last  # a preemption notice: checkpoint here and leave
            do_ckpt = done % t.checkpoint_every == 0 or is_switch or is_last or stop
            do_log = do_log or stop
            metrics = None
            if do_eval:
                val_loss = self.evaluate()
            if do_log or do_ckpt:
                metrics = self._metrics(done, step, loss, gnorm, timer, val_loss if do_eval else None)
                timer.reset()
                self._moe_interval = []
            if do_ckpt:
                self.save(metrics)
            elif do_log:
                self.reporter.report(metrics, None, done)
            step = done
            if stop:
                status = "stopped"
                if self.rank == 0:
                    say(f"[tst] stop requested (SIGTERM): checkpoint written at step {done}/{self.T}; resume "
                        f"with `tst train --resume <run>`")
                break
        if hasattr(it, "close"):
            it.close()
        if val_loss is None and status == "finished":  # resumed at the end: no step ran, the loss is still known
            val_loss = self.evaluate()
        summary = {
            "kind": "final",
            "step": self.state.step,
            "status": status,
            "final_val_loss": val_loss,
            "final_train_loss": losses[-1][1] if losses else None,
            "raw_tokens": self.raw_tokens_before(self.state.step),
            "elapsed_s": self.state.elapsed_s + (time.perf_counter() - self._t_start),
            "switch_step": self.switch_step,
            "epochs": self.source.epoch_at(self.state.step),
            "world_size": self.world_size,
            "machine": machine_info(),  # the float numerics depend on it (tst demo differs by host in the 3rd digit)
        }
        if status == "nonfinite":
            summary["message"] = (
                f"non-finite loss or gradient norm at step {self.state.step}; the run stopped. Last good "
                f"checkpoint: {self.reporter.last_good_checkpoint() or 'none'}. Lower train.lr or raise "
                f"train.warmup_steps, then resume from that checkpoint")
        self.reporter.report(summary, None, self.state.step)
        return summary

    def _metrics(self, done: int, step: int, loss: float, gnorm: float, timer: StepTimer,
                 val_loss: Optional[float]) -> dict:
        rates = timer.rates()
        phase = self.phase_at(step)
        elapsed = self.state.elapsed_s + (time.perf_counter() - self._t_start)
        achieved = self.flops_per_position * rates["positions_per_s"]
        m = {
            "step": done,
            "phase": phase,
            "bag_size": self.bag_size_at(step),
            "train_loss": loss,
            f"train_loss_{phase}": loss,
            "lr": self.lr_at(step),
            "grad_norm": gnorm,
            "raw_tokens": self.raw_tokens_before(done),
            "latent_positions": done * self.cfg.train.global_batch_size * self.cfg.data.seq_len,
            "epoch": self.source.epoch_at(done),
            "elapsed_s": elapsed,
            "flops": float(self.flops_per_position) * done * self.cfg.train.global_batch_size * self.cfg.data.seq_len,
            "tflops_per_s": achieved / 1e12,
            "world_size": self.world_size,
            "eta_s": rates["step_time_s"] * (self.T - done),
            **rates,
        }
        if self.peak_flops:
            m["mfu"] = achieved / (self.peak_flops * self.world_size)
        if val_loss is not None:
            m["val_loss"] = val_loss
        if hasattr(self.source, "data_metrics"):  # a mixture: training tokens read per source
            m.update(self.source.data_metrics(done))
        if self._moe_interval:
            m.update(moe_metrics(self._moe_interval))
        return m


def moe_metrics(steps: list[dict]) -> dict:
    """Per logging interval (the steps since the last log): the mean load-balancing and z losses, and each MoE
    layer's expert load, the busiest expert's share of the interval's token assignments over the ideal 1/E
    (1 = perfectly balanced; at most E/k, every token on the same k experts). `expert_load_max`: over layers."""
    counts = sum(s["counts"] for s in steps)  # (n_moe, E)
    E = counts.shape[1]
    load = (counts.max(dim=1).values / counts.sum(dim=1).clamp_min(1) * E).tolist()
    out = {"moe_aux_loss": sum(s["aux"] for s in steps) / len(steps),
           "moe_z_loss": sum(s["z"] for s in steps) / len(steps), "expert_load_max": max(load)}
    out.update({f"expert_load_l{i}": v for i, v in enumerate(load)})
    return out


def _maybe_record_digests(step: int, windows, first_row: int) -> None:
    """Data drills and tests: with TST_WINDOW_DIGESTS=DIR every rank appends, per step, a digest of each window it
    is about to train on, keyed by the window's row in the global batch, so runs with different worker counts,
    kills and resumes can be compared window for window; `t` (wall time) and the file's pid tell a fault drill
    which process trained a step when (bench/chaos.py)."""
    folder = os.environ.get("TST_WINDOW_DIGESTS")
    if not folder:
        return
    import hashlib

    w, _ = _split_doc_ids(windows)
    rows = {first_row + i: hashlib.sha1(w[i].to(torch.int64).numpy().tobytes()).hexdigest()[:16] for i in range(w.shape[0])}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"digests-{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "rows": rows, "t": round(time.time(), 3)}) + "\n")


def read_digests(folder: str) -> dict[int, dict[int, str]]:
    """{step: {global row: digest}} from TST_WINDOW_DIGESTS files; a step redone after a restart must have read
    the same windows: a row seen with two different digests reads "conflict"."""
    out: dict[int, dict[int, str]] = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            for line in f:
                rec = json.loads(line)
                rows = out.setdefault(rec["step"], {})
                for k, v in rec["rows"].items():
                    rows[int(k)] = v if rows.get(int(k), v) == v else "conflict"
    return out


def _maybe_pace() -> None:
    """Fault drills: with TST_STEP_PACE_FILE=PATH every rank sleeps, before each step, the seconds written in PATH
    (absent or empty: no sleep). A drill slows the run while it waits for Ray to grow an elastic group back, so
    the run is still going when it does; timing only, never the data or the math (bench/chaos.py)."""
    path = os.environ.get("TST_STEP_PACE_FILE")
    if not path:
        return
    try:
        with open(path) as f:
            pace = float(f.read() or 0)
    except (OSError, ValueError):
        return
    if pace > 0:
        time.sleep(pace)


def _maybe_inject_failure(step: int, rank: int) -> None:
    """Fault injection for failure-recovery tests and drills: TST_INJECT_FAILURE="STEP:RANK:MODE:MARKER" makes
    rank RANK fail before step STEP, once (the MARKER file records that it happened); several faults are
    separated by commas, each with its own marker. MODE "raise" raises an error in the worker; "kill" SIGKILLs
    the worker process, as a preempted node would; "stop" SIGSTOPs it (a hung rank: the others wait in a
    collective until scaling.collective_timeout_s); "fatal" raises a DataError at every attempt (a deterministic
    error, which must end the run once, not be retried)."""
    spec = os.environ.get("TST_INJECT_FAILURE")
    if not spec:
        return
    for one in spec.split(","):
        _inject_one(one, step, rank)


def _inject_one(spec: str, step: int, rank: int) -> None:
    at, who, mode, marker = spec.split(":", 3)
    if step == int(at) and rank == int(who) and mode == "fatal":  # every time: a deterministic error
        from pipeline.errors import DataError

        with open(marker, "a") as f:  # one line per attempt: a test counts the attempts
            f.write(f"fatal at step {step} on rank {rank}\n")
        raise DataError(f"injected deterministic error at step {step} on rank {rank} (TST_INJECT_FAILURE)")
    if step != int(at) or rank != int(who) or os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(f"failed at step {step} on rank {rank}\n")
    if mode in ("kill", "stop"):
        import signal

        os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGSTOP)  # stop: a hung rank
    raise RuntimeError(f"injected failure at step {step} on rank {rank} (TST_INJECT_FAILURE)")


def _resolved_config(cfg: Config, model_cfg) -> dict:
    import dataclasses

    d = cfg.to_dict()
    d["model"] = dataclasses.asdict(model_cfg)
    return d


STOP = {"requested": False}  # set by the Ray-free driver's SIGTERM handler (pipeline/runner.py)


class LocalReporter:
    """Ray-free reporting: metrics straight to a MetricsSink, checkpoints published atomically on disk."""

    is_chief = True

    def stop_requested(self) -> bool:
        return STOP["requested"]

    def __init__(self, run_dir: str, sink, keep: int = 3, resume: bool = True):
        from pipeline.train.checkpoint import LocalCheckpointManager

        self.ckpts = LocalCheckpointManager(run_dir, keep)
        self.sink = sink
        self.resume = resume
        self.published: list[str] = []

    def staging_dir(self, step: int) -> str:
        return self.ckpts.staging_dir(step)

    def report(self, metrics: Optional[dict], checkpoint_staging: Optional[str], step: int) -> None:
        if checkpoint_staging:
            self.published.append(self.ckpts.publish(checkpoint_staging, step))
        if metrics and self.sink is not None:
            self.sink.log(metrics)

    @contextlib.contextmanager
    def latest_checkpoint(self):
        yield self.ckpts.latest() if self.resume else None

    def last_good_checkpoint(self) -> Optional[str]:
        ckpts = self.ckpts.list()
        return ckpts[-1] if ckpts else None


def train(cfg: Config, source, reporter: Reporter, *, vocab_size: int, device: Optional[torch.device] = None,
          tokenizer_path: Optional[str] = None, checkpoints: bool = True) -> dict:
    """Run (or resume) a whole TST run on this rank. Works in one process or inside a Ray Train worker."""
    trainer = Trainer(cfg, source, reporter, vocab_size=vocab_size, device=device, tokenizer_path=tokenizer_path,
                      checkpoints=checkpoints)
    return trainer.run()
