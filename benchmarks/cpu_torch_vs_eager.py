"""fastmil's torch backend vs the eager padded formulation on CPU, at sizes above the smoke set.

    python -m benchmarks.cpu_torch_vs_eager

Forward+backward wall time (median of 9 after 2 warm-ups, 2 threads) of
``fastmil.reference.eager_attention_pool`` on padded + mask input, ``attention_pool(...,
backend="torch")`` on its native layout (one bag, or packed + offsets), and the same on padded +
mask. The pytest-benchmark suite (``pytest benchmarks/``) stays on tiny shapes on CPU so that CI
is quick; this script answers "is the torch backend slower than eager on a CPU?".
"""

from __future__ import annotations

import torch

import fastmil
from benchmarks.eager import eager_attention_pool

from .timing import cpu_median

CASES = [  # (bag lengths, D, L, dtype)
    ([20_000], 1024, 256, torch.float32),
    ([20_000], 1024, 256, torch.bfloat16),
    ([3000, 800, 1500, 2200], 512, 128, torch.float32),
    ([10] * 256, 500, 128, torch.float32),
]


def median_ms(fn, reps=9):
    fn()  # one warm-up on top of cpu_median's own
    return cpu_median(fn, rounds=reps) * 1e3


def run_case(lengths, D, L, dtype):
    """One table row: the three timings of one case."""
    x, offsets = fastmil.pack([torch.randn(n, D, dtype=dtype) for n in lengths])
    xp, mask = fastmil.pad(x, offsets)
    x.requires_grad_()
    xp.requires_grad_()
    V, U = ((torch.randn(L, D) * D ** -0.5).to(dtype).requires_grad_() for _ in range(2))
    w = torch.randn(L).to(dtype).requires_grad_()
    bV, bU = (torch.zeros(L, dtype=dtype, requires_grad=True) for _ in range(2))
    native = {} if len(lengths) == 1 else {"offsets": offsets}  # one bag: x [N, D] as it is

    def eager():
        z = eager_attention_pool(xp, V, U, w, attn_bias=bV, gate_bias=bU, mask=mask)
        z.float().sum().backward()

    def ours(inp, **layout):
        z = fastmil.attention_pool(inp, V, U, w, attn_bias=bV, gate_bias=bU, backend="torch",
                                   **layout)
        z.float().sum().backward()

    t_eager = median_ms(eager)
    t_native = median_ms(lambda: ours(x, **native))
    t_padded = median_ms(lambda: ours(xp, mask=mask))
    desc = f"{len(lengths)} of {sum(lengths) // len(lengths)} avg, D={D}, L={L}"
    return (f"| {desc} | {str(dtype)[6:]} | {t_eager:.1f} ms | {t_native:.1f} ms "
            f"({t_eager / t_native:.2f}×) | {t_padded:.1f} ms ({t_eager / t_padded:.2f}×) |")


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    print("| bags | dtype | eager, padded + mask | fastmil torch, native layout "
          "| fastmil torch, padded + mask |")
    print("| --- | --- | ---: | ---: | ---: |")
    for case in CASES:
        print(run_case(*case))


if __name__ == "__main__":
    main()
