"""tst_ops: everything Token Superposition Training changes in a training step, as small PyTorch functions.

No Ray, no FSDP, no config: bags and next-bag targets (``bags.py``), the multi-hot cross-entropy reference
(``loss.py``), its fused, chunked LM-head version (``fused.py``, with a Triton kernel on CUDA in
``triton_kernels.py``, imported lazily) and the phase / learning-rate schedule (``schedule.py``). ``bench.py``
(not imported here) measures the fused loss against the reference; ``bench/ops.py`` is its command line.
Imports nothing but torch and the standard library.
"""

from . import schedule
from .bags import bag_embedding, fold_bags, next_bag_targets
from .fused import auto_chunk_size, fused_linear_multi_hot_cross_entropy
from .loss import multi_hot_cross_entropy, slot_coefficients, slot_weights
from .schedule import (
    bag_size_at,
    check_schedule,
    phase_at,
    raw_tokens_before,
    switch_step,
    wsd_lr,
)

__all__ = [
    "auto_chunk_size",
    "bag_embedding",
    "bag_size_at",
    "check_schedule",
    "fold_bags",
    "fused_linear_multi_hot_cross_entropy",
    "multi_hot_cross_entropy",
    "next_bag_targets",
    "phase_at",
    "raw_tokens_before",
    "schedule",
    "slot_coefficients",
    "slot_weights",
    "switch_step",
    "wsd_lr",
]
