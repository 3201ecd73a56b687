"""Bags of tokens: folding a raw window into bags, the next-bag targets and the bag embedding.

Why here and not in the model or the data: the data side delivers raw windows of ``s*L + s`` (or ``s*L + 1``)
token ids and knows nothing about the loss (design notes, "The contract between data and trainer"); the
trainer turns a window into model inputs ``(B, L, s)`` and targets ``(B, L, s)`` with these functions, so a
recovery step is the same code with ``s = 1``.

Paper facts implemented (tst-paper.md, "The method" and Listings 1-3):
- Listing 1: the ``(B, s*L)`` ids are viewed as ``L`` contiguous, non-overlapping bags ``(B, L, s)``.
- Listing 2: the embedding of a bag is the plain mean of its ``s`` token embeddings, summed in float32,
  divided by ``s`` and cast back to the compute dtype; no scaling, projection or new parameter.
- Listing 3: latent position ``j`` predicts raw tokens ``(j+1)*s .. (j+2)*s - 1``; built from the next-token
  labels padded on the right with ``s - 1`` ignores, the first ``s - 1`` dropped, viewed as ``(B, L, s)``.
  Slots that fall past the end of the window are ignored.

Decision (the paper is silent): documents in packed data. The default policy is "cross": bags and targets
flow over EOS exactly as ordinary packed next-token training does (EOS is an ordinary token to predict, and a
bag may hold the end of one document and the start of the next). When ``doc_ids`` is given the policy is
"mask": target slot ``(j, i)`` is ignored when the document id of its token differs from that of the LAST token
of input bag ``j``, so a bag never predicts into a document it has not seen the start of; EOS, which belongs to
the document it ends, stays a target. Inputs are never masked (bags still mix documents). With ``s = 1`` this
is the usual document-masked next-token loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_bag_size(bag_size) -> int:
    if isinstance(bag_size, bool) or not isinstance(bag_size, int) or bag_size < 1:
        raise ValueError(f"bag_size must be an int >= 1, got {bag_size!r}")
    return bag_size


def fold_bags(tokens: torch.Tensor, bag_size: int) -> torch.Tensor:
    """View a raw window ``(B, s*L)`` as bags ``(B, L, s)`` (Listing 1); a view whenever the input allows.

    A length that is not a multiple of ``bag_size`` is a ``ValueError`` (never a silent crop).
    """
    s = _check_bag_size(bag_size)
    if tokens.dim() != 2:
        raise ValueError(f"fold_bags expects (B, s*L) tokens, got shape {tuple(tokens.shape)}")
    n = tokens.shape[1]
    if n % s != 0 or n == 0:
        raise ValueError(
            f"window length {n} is not a positive multiple of bag_size {s}; "
            f"pass the first s*L tokens of the window (e.g. window[:, :{(n // s) * s}])"
        )
    return tokens.unflatten(1, (n // s, s))  # (B, L, s)


def _num_bags(window_len: int, s: int) -> int:
    """L for a window of ``s*L + s`` or ``s*L + 1`` tokens (unambiguous for s >= 2; equal for s = 1)."""
    if window_len >= 2 * s and window_len % s == 0:
        return window_len // s - 1  # s*L + s
    if s > 1 and window_len > s and window_len % s == 1:
        return (window_len - 1) // s  # s*L + 1 (the paper's listing)
    raise ValueError(
        f"a window of {window_len} tokens is neither s*L + s nor s*L + 1 with s = {s} and L >= 1"
    )


def next_bag_targets(
    window: torch.Tensor,
    bag_size: int,
    ignore_index: int = -100,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Targets ``(B, L, s)`` (int64) of a raw window ``(B, s*L + 1)`` or ``(B, s*L + s)``.

    ``targets[b, j, i] = window[b, (j+1)*s + i]``, or ``ignore_index`` when that position is past the window's
    end (only the ``s*L + 1`` form has such slots: its last bag keeps one target) or, when ``doc_ids`` (same
    shape as ``window``) is given, when ``doc_ids[b, (j+1)*s + i] != doc_ids[b, j*s + s - 1]``
    (the "mask" document policy, module docstring). The inputs of the same window are
    ``fold_bags(window[:, :s*L], s)``.
    """
    s = _check_bag_size(bag_size)
    if window.dim() != 2:
        raise ValueError(f"next_bag_targets expects a (B, T) window, got shape {tuple(window.shape)}")
    B, T = window.shape
    L = _num_bags(T, s)
    full = s * L + s
    win = window.to(torch.int64)
    if T < full:  # Listing 3: pad on the right with ignores (the s*L + 1 form)
        win = F.pad(win, (0, full - T), value=ignore_index)
    targets = win[:, s:].reshape(B, L, s)  # (B, L, s): raw positions (j+1)*s + i
    if doc_ids is not None:
        if doc_ids.shape != window.shape:
            raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != window shape {tuple(window.shape)}")
        d = doc_ids
        if T < full:
            # positions past the end are ignored already; pad with the last id so they compare equal
            d = torch.cat([d, d[:, -1:].expand(B, full - T)], dim=1)
        d_target = d[:, s:].reshape(B, L, s)  # (B, L, s) doc of each target token
        d_last_input = d[:, s - 1 : s * L : s].unsqueeze(-1)  # (B, L, 1) doc of the last token of bag j
        targets = targets.masked_fill(d_target != d_last_input, ignore_index)
    return targets


def bag_embedding(bags: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean embedding of bags ``(B, L, s)`` -> ``(B, L, D)`` in ``weight.dtype`` (Listing 2).

    The ``s`` rows are summed in float32 (float64 stays float64), divided by ``s`` and cast back; with
    ``s = 1`` the result equals ``F.embedding`` bit for bit. ``(B, L)`` ids are embedded as usual. The sum is
    a loop over slots, so no ``(B, L, s, D)`` tensor is ever held.
    """
    if bags.dim() == 2:
        return F.embedding(bags, weight)  # (B, L, D)
    if bags.dim() != 3:
        raise ValueError(f"bag_embedding expects (B, L, s) or (B, L) ids, got shape {tuple(bags.shape)}")
    s = bags.shape[-1]
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    acc = F.embedding(bags[..., 0], weight).to(acc_dtype)  # (B, L, D) float32
    for i in range(1, s):
        acc = acc + F.embedding(bags[..., i], weight).to(acc_dtype)  # (B, L, D)
    return (acc / s).to(weight.dtype)  # (B, L, D) compute dtype
