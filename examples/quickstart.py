"""Pool a few random variable-length bags with every fastmil backend and compare with the reference.

    python examples/quickstart.py

On a CUDA machine the Triton backend runs compiled on the GPU; without one it runs in Triton's
interpreter on the CPU (slow, but the same kernels).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must be set before Triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastmil  # noqa: E402
from fastmil.reference import attention_pool_reference  # noqa: E402
from fastmil.triton_backend import triton_unavailable_reason  # noqa: E402


def main():
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    D, L = 64, 32
    bags = [torch.randn(n, D, device=device) for n in (3, 10, 1, 6)]
    x, offsets = fastmil.pack(bags)  # x [20, 64], offsets [0, 3, 13, 14, 20]
    pool = fastmil.AttentionPool(D, L).to(device)
    weights = (pool.attn.weight, pool.gate.weight, pool.score.weight[0])
    biases = dict(attn_bias=pool.attn.bias, gate_bias=pool.gate.bias, score_bias=pool.score.bias)
    print(f"{len(bags)} bags of lengths {[len(b) for b in bags]}, D={D}, L={L}, on {device}")
    print(f"packed x {tuple(x.shape)}, offsets {offsets.tolist()}")

    with torch.no_grad():
        z_ref, a_ref = attention_pool_reference(x, *weights, **biases, offsets=offsets,
                                                return_attention=True)
        results = {"reference": (z_ref, a_ref)}
        for backend in ("torch", "triton"):
            reason = triton_unavailable_reason(x) if backend == "triton" else None
            if reason is not None:
                print(f"backend={backend!r} skipped: {reason}")
                continue
            results[backend] = fastmil.attention_pool(x, *weights, **biases, offsets=offsets,
                                                      return_attention=True, backend=backend)

    print(f"\n{'backend':<10} {'z[:2, :4] (bags 0 and 1, first 4 features)':<52} max|z - ref|")
    for name, (z, _) in results.items():
        head = "  ".join("[" + " ".join(f"{v:+.3f}" for v in row[:4].tolist()) + "]" for row in z[:2])
        err = (z - z_ref).abs().max().item()
        print(f"{name:<10} {head:<52} {err:.1e}")
    print("\nattention of bag 0 (3 instances), per backend:")
    for name, (_, a) in results.items():
        print(f"  {name:<10} {[round(v, 4) for v in a[:3].tolist()]}")
    # the padded layout gives the same pooled vectors
    xp, mask = fastmil.pad(x, offsets)
    with torch.no_grad():
        z_pad = pool(xp, mask=mask)
    print(f"\npadded layout x {tuple(xp.shape)} + mask: max|z - ref| = "
          f"{(z_pad - z_ref).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
