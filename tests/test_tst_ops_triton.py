"""The Triton kernel of the fused multi-hot cross-entropy (tst_ops/triton_kernels.py).

On a CUDA machine the kernel runs natively against the PyTorch path. Without a GPU it runs under the Triton
interpreter (``TRITON_INTERPRET=1``) on CPU tensors, in a subprocess because the interpreter flag is read when
the kernel is defined. Both need ``triton`` importable; otherwise the tests skip (triton is a ~290 MB wheel
that ships with CUDA builds of torch and is not a CPU dependency of this project).
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
    import sys, torch
    from tst_ops import fused_linear_multi_hot_cross_entropy as fused
    dev = sys.argv[1]
    cases = [  # N, D, V, s, chunk, weights, dtype
        (13, 8, 37, 3, 5, "power", torch.float32),
        (1, 8, 50, 1, None, "uniform", torch.float32),
        (9, 16, 70, 16, 4, "uniform", torch.float32),
        (11, 8, 45, 6, 4, "uniform", torch.bfloat16),
    ]
    for N, D, V, s, chunk, weights, dt in cases:
        g = torch.Generator().manual_seed(N + s)
        h = torch.randn(N, D, generator=g).to(dt).to(dev).requires_grad_()
        w = torch.randn(V, D, generator=g).to(dt).to(dev).requires_grad_()
        t = torch.randint(0, V, (N, s), generator=g)
        t[torch.rand(N, s, generator=g) < 0.2] = -100
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
        assert abs(lt - lr) <= 1e-5 * abs(lr) + 1e-6, (lt, lr)
        assert abs(nograd.item() - lr) <= 1e-5 * abs(lr) + 1e-6
        tol = 1e-5 if dt == torch.float32 else 2e-2
        for a, b in zip(out["triton"][1:], out["torch"][1:]):
            err = ((a.double() - b.double()).norm() / b.double().norm()).item()
            assert err < tol, (N, s, dt, err)
    print("TRITON-OK")
    """
)


def _run(device, env):
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, device], env=env, capture_output=True, text=True, timeout=240,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0 and "TRITON-OK" in proc.stdout, proc.stdout + proc.stderr


def test_triton_kernel_matches_torch_path_interpreted_on_cpu():
    env = dict(os.environ, TRITON_INTERPRET="1")
    _run("cpu", env)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernel_matches_torch_path_on_cuda():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    _run("cuda", env)
