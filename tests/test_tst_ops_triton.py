"""The Triton kernel of the fused multi-hot cross-entropy (tst_ops/triton_kernels.py).

On a CUDA machine the kernel runs natively. Without a GPU (CI) it runs under the Triton interpreter
(``TRITON_INTERPRET=1``) on CPU tensors, in a subprocess because the interpreter flag is read when the kernel is
defined. ``triton`` is in the ``dev`` extra (pyproject.toml: the version torch 2.11's CUDA wheels require), so
these tests run in CI; they skip only where triton cannot be installed (not Linux).

What they must catch: the kernel streams each row in vocabulary blocks with an ONLINE log-sum-exp (running max
``m``, running sum ``d`` rescaled by ``exp(m_old - m_new)`` when a later block holds a larger logit). A
vocabulary of one block never runs that rescale, so every case here spans at least three blocks and ends in a
partial one (odd V), and the logits are built so that the running max rises from block to block (a ramp, a late
spike), stays in the first block (a falling ramp), or sits near float32's exp overflow (+100). Dropping or
inverting the rescale, skipping a block or mis-masking the partial one changes the loss by far more than the
tolerances (checked by breaking the kernel by hand: see the commit message).

- ``kernel``: ``mce_rows_inplace`` with small forced blocks against a float64 reference built another way
  (``log_softmax`` over the whole row and autograd for the gradient), fp32 and bf16 logits, with and without
  the gradient.
- ``fused``: the whole fused loss with the kernel's default block (8192 columns) on vocabularies of 2.5 and
  3.5 blocks, plus the original single-block cases, against the chunked PyTorch path.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

CHECK = textwrap.dedent(
    """
    import math, sys
    import torch
    import triton

    # triton 3.6.0 (the version torch 2.11 pairs with) converts a runtime scalar to a Python int with
    # int(ndarray of shape (1,)), which NumPy >= 2.4 refuses (TypeError: only 0-dimensional arrays can be
    # converted to Python scalars), so `range(0, V, BLOCK_V)` fails under the interpreter. Upstream issue
    # triton-lang/triton#9171, fixed by PR #9172 (.squeeze()); triton 3.8.0's interpreter has the fix. This
    # applies the same one-line fix to the interpreter only, and only on 3.6.x; compiled kernels are untouched.
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7):
        import triton.runtime.interpreter as _interp

        _patch = _interp._patch_lang_tensor

        def _patch_lang_tensor(tensor, scope):
            _patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

        _interp._patch_lang_tensor = _patch_lang_tensor

    from tst_ops import fused_linear_multi_hot_cross_entropy as fused
    from tst_ops.triton_kernels import mce_rows_inplace

    dev, which = sys.argv[1], sys.argv[2]


    def reference(z, t, a):
        # float64 loss and dloss/dz of the multi-hot CE, computed another way than the kernel: log_softmax over
        # the whole row at once, and autograd for the gradient.
        zd = z.detach().double().cpu().requires_grad_()
        logp = torch.log_softmax(zd, dim=1)
        rows = -(a.double().cpu() * logp.gather(1, t.cpu())).sum(1)
        (dz,) = torch.autograd.grad(rows.sum(), zd)
        return rows.detach(), dz


    def logits(C, V, block, g):
        z = torch.randn(C, V, generator=g) * 2
        blk = (torch.arange(V) // block).double()
        z[0] += 4.0 * blk  # running max rises at every block, the largest in the partial last one
        z[1] -= 4.0 * blk  # max in the first block: later blocks only add
        z[2, V - 1] = 30.0  # a spike in the last column: one late, large jump of the running max
        z[3] += 100.0  # exp(z) overflows float32 without the max subtracted
        return z


    if which == "kernel":
        # C, V, s, BLOCK_V, dtype: 3 to 7 blocks, the last one partial
        cases = [(5, 37, 3, 16, torch.float32), (4, 101, 1, 32, torch.float32), (6, 29, 16, 8, torch.float32),
                 (4, 57, 6, 8, torch.bfloat16)]
        g = torch.Generator().manual_seed(0)
        for C, V, S, block, dt in cases:
            assert math.ceil(V / block) >= 3 and V % block != 0, (V, block)
            z0 = logits(C, V, block, g).to(dt)
            t = torch.randint(0, V, (C, S), generator=g)
            t[0, 0] = V - 1  # a target in the partial last block
            if S > 1:
                t[1, 1] = t[1, 0]  # a duplicate in a bag: coefficients add
            a = torch.rand(C, S, generator=g)
            a[torch.rand(C, S, generator=g) < 0.25] = 0.0  # ignored slots
            ref_loss, ref_dz = reference(z0, t, a)
            for need_grad in (False, True):
                z = z0.clone().to(dev)
                rows = mce_rows_inplace(z, t.to(dev), a.to(dev), need_grad, block_v=block).double().cpu()
                err = (rows - ref_loss).abs().max().item()
                assert err <= 1e-5 * ref_loss.abs().max().item() + 1e-6, (C, V, S, block, dt, need_grad, err)
                if not need_grad:
                    assert torch.equal(z.cpu(), z0), "the kernel wrote the logits without need_grad"
                    continue
                assert z.dtype == dt
                dz = z.double().cpu()
                # fp32: softmax in fp32 registers; bf16: the stored dz is cast to bf16, within one bf16 ulp
                # (2**-7 relative): the interpreter's cast truncates, CUDA's rounds to nearest (half an ulp)
                rel = 1e-6 if dt == torch.float32 else 2.0**-7
                bad = (dz - ref_dz).abs() > rel * ref_dz.abs() + 1e-6
                assert not bad.any(), (C, V, S, block, dt, bad.nonzero()[:5].tolist(), (dz - ref_dz).abs().max())
        print("TRITON-OK")

    if which == "fused":
        # N, D, V, s, chunk, weights, dtype. The first two span 3.5 and 2.5 of the default 8192-column blocks.
        cases = [
            (7, 8, 3 * 8192 + 4097, 4, 3, "power", torch.float32),
            (5, 8, 2 * 8192 + 4097, 2, None, "uniform", torch.bfloat16),
            (13, 8, 37, 3, 5, "power", torch.float32),
            (1, 8, 50, 1, None, "uniform", torch.float32),
            (9, 16, 70, 16, 4, "uniform", torch.float32),
            (11, 8, 45, 6, 4, "uniform", torch.bfloat16),
        ]
        for N, D, V, s, chunk, weights, dt in cases:
            g = torch.Generator().manual_seed(N + s)
            h = torch.randn(N, D, generator=g)
            # lm-head rows whose norm grows with the token id: the logits, and so the running max, grow from
            # block to block (the rescale runs at every block boundary)
            w = torch.randn(V, D, generator=g) * torch.linspace(0.5, 3.0, V)[:, None]
            h = h.to(dt).to(dev).requires_grad_()
            w = w.to(dt).to(dev).requires_grad_()
            t = torch.randint(0, V, (N, s), generator=g)
            t[torch.rand(N, s, generator=g) < 0.2] = -100
            t[0, 0] = V - 1  # a target in the partial last block
            if N > 1 and s > 1:
                t[1, 1] = t[1, 0]  # duplicate in a bag
            t = t.to(dev)
            out = {}
            for backend in ("triton", "torch"):
                loss = fused(h, w, t, weights, chunk_size=chunk, backend=backend)
                out[backend] = (loss, *torch.autograd.grad(loss, (h, w)))
            with torch.no_grad():
                nograd = fused(h, w, t, weights, chunk_size=chunk, backend="triton")
            lt, lr = out["triton"][0].item(), out["torch"][0].item()
            assert abs(lt - lr) <= 1e-5 * abs(lr) + 1e-6, (N, V, lt, lr)
            assert abs(nograd.item() - lr) <= 1e-5 * abs(lr) + 1e-6, (N, V, nograd.item(), lr)
            tol = 1e-5 if dt == torch.float32 else 2e-2
            for a, b in zip(out["triton"][1:], out["torch"][1:]):
                err = ((a.double() - b.double()).norm() / b.double().norm()).item()
                assert err < tol, (N, V, s, dt, err)
        print("TRITON-OK")
    """
)


def _run(device, which, env):
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, device, which], env=env, capture_output=True, text=True, timeout=240,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0 and "TRITON-OK" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("which", ["kernel", "fused"])
def test_triton_kernel_interpreted_on_cpu(which):
    _run("cpu", which, dict(os.environ, TRITON_INTERPRET="1"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("which", ["kernel", "fused"])
def test_triton_kernel_on_cuda(which):
    _run("cuda", which, {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
