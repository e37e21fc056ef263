"""Right gradients whatever the inputs and the incoming gradients look like.

A battery in the manner of PyTorch's OpInfo tests, on both backends against the float64 oracle
(:func:`fastmil.reference.attention_pool_reference`), over

* the options: layout (packed, padded with a mask that has holes, one bag), K = 1 or 2, gated
  or plain, biases on or off, each activation, dropout on or off, recompute, float32 or 16-bit,
  x trainable or frozen;
* the memory layout of every tensor argument: contiguous, or a view that is not (x sliced from
  a wider tensor or transposed, weights transposed, biases strided, the mask and the offsets
  views of wider tensors);
* the incoming gradient of every output (z, the attention, the raw scores): contiguous,
  expanded (``.sum()`` or ``.mean()``: stride 0), transposed, sliced (a view with gaps, as
  ``torch.cat``'s backward hands out), or none (output unused).

With dropout on there is no oracle: the same call with every tensor contiguous and the same seed
must give the same numbers. The product of it all is large; CI runs a seeded sample of
``FASTMIL_BATTERY_CASES`` cases (default 240), the GPU check the whole option product (each
option combination once, its memory layouts drawn at random) and every combination of incoming
gradients (``FASTMIL_BATTERY_CASES=all``).
"""

from __future__ import annotations

import itertools
import os
import random

import pytest
import torch
from conftest import (
    BACKENDS,
    TOL,
    WEIGHT_NAMES,
    assert_close,
    backend_device,
    call,
    clone_weights,
    make_layout,
    make_weights,
    skip_unsupported,
    weight_tensors,
)

import fastmil
from fastmil.reference import attention_pool_reference

OPTIONS = {
    "layout": ["packed", "padded", "single"],
    "K": [1, 2],
    "gated": [True, False],
    "bias": [True, False],
    "activation": ["tanh", "relu", "gelu"],
    "dropout": [False, True],
    "recompute": [False, True],
    "dtype": ["float32", "16-bit"],
    "x_grad": [True, False],
}
GRADIENT_LAYOUTS = ["contiguous", "expanded", "transposed", "sliced", "none"]
OUTPUTS = ("z", "attention", "scores")
INPUTS = ("x", "attn_weight", "gate_weight", "score_weight", "attn_bias", "gate_bias",
          "score_bias", "mask", "offsets")
D, L = 10, 6
LENGTHS = [3, 0, 1, 6]  # an empty bag and a one-instance bag among them


def _all_cases():
    """Every option combination once per backend (memory layouts drawn at random), then every
    combination of incoming gradients on a few option sets."""
    rng = random.Random(0)
    cases = []
    for backend in BACKENDS:
        for values in itertools.product(*OPTIONS.values()):
            case = dict(zip(OPTIONS, values, strict=True), backend=backend)
            case["grads"] = tuple(rng.choice(GRADIENT_LAYOUTS) for _ in OUTPUTS)
            case["views"] = tuple(rng.random() < 0.5 for _ in INPUTS)
            cases.append(case)
        for layout, grads in itertools.product(OPTIONS["layout"],
                                               itertools.product(GRADIENT_LAYOUTS, repeat=3)):
            cases.append(dict(backend=backend, layout=layout, K=2, gated=True, bias=True,
                              activation="tanh", dropout=False, recompute=False,
                              dtype="float32", x_grad=True, grads=grads,
                              views=tuple(rng.random() < 0.5 for _ in INPUTS)))
    return cases


def _cases():
    cases = _all_cases()
    n = os.environ.get("FASTMIL_BATTERY_CASES", "240")
    if n != "all":
        cases = random.Random(1).sample(cases, min(int(n), len(cases)))
    return [pytest.param(c, id="-".join(f"{v}" for k, v in c.items() if k not in ("grads", "views"))
                         + "-" + "_".join(c["grads"])) for c in cases]


def _dtype(case, device):
    if case["dtype"] == "float32":
        return torch.float32
    return torch.bfloat16 if device == "cuda" else torch.float16


def _view(t, as_view):
    """``t``'s values, in a tensor that is not contiguous (when ``as_view``): a 2-D tensor as
    the transpose of its transpose, or sliced from one twice as wide when it has one column;
    a 1-D tensor as every second element of one twice as long."""
    if not as_view or t is None:
        return t
    if t.dim() == 1:
        wide = torch.zeros(2 * t.shape[0], dtype=t.dtype, device=t.device)
        wide[::2] = t
        return wide[::2]
    if t.dim() == 2 and t.shape[1] > 1:
        return t.t().contiguous().t()
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def _inputs(case, device):
    """float64 master values of the case: x, weights, mask or offsets (on the CPU, as
    ``fastmil.collate`` makes them)."""
    K = case["K"]
    weights = make_weights(D, L, None if K == 1 else K, case["gated"], case["bias"],
                           torch.float64, device=device)
    if case["layout"] == "single":
        x, extra = make_layout("single", [5], D, torch.float64, device=device)
    elif case["layout"] == "packed":
        x, extra = make_layout("packed", LENGTHS, D, torch.float64, device=device)
        extra["offsets"] = extra["offsets"].cpu()
    else:  # padded, with real instances scattered among the padding (holes), in every bag
        x, extra = make_layout("padded_holes", LENGTHS, D, torch.float64, spare=2, device=device)
    return x, weights, extra


def _loss(outputs, grads, upstream):
    """A loss whose gradient reaches each output in the layout ``grads`` names (``upstream``:
    the values of the contiguous, transposed and sliced ones). Nothing stands between an output
    and the op that shapes its gradient (a cast or a ``where`` would hand it a fresh contiguous
    tensor): the upstream values are cast to the output's dtype instead."""
    loss = 0
    for name, how in zip(OUTPUTS, grads, strict=True):
        out = outputs.get(name)
        if out is None or how == "none":
            continue
        u = upstream[name].to(out.dtype)
        if how == "contiguous":
            term = (out * u).sum()
        elif how == "expanded":  # stride 0 in every dimension
            term = out.sum() if name != "attention" else out.mean() * 3
        elif how == "transposed" and out.dim() > 1:  # the last two strides swapped
            term = (out.transpose(-1, -2) * u.transpose(-1, -2).contiguous()).sum()
        elif how == "transposed":  # a 1-D output has no transpose
            term = (out * u).sum()
        else:  # sliced: every second element of a tensor twice as wide (stride 2)
            term = (torch.stack([out, torch.zeros_like(out)], -1) * torch.stack([u, u], -1)).sum()
        loss = loss + term.double()
    return loss


def _run(fn, case, x, weights, extra, upstream, *, seed=None, **kwargs):
    """Outputs and gradients (of x, when it is trainable, and of every weight) of one call."""
    leaves = {n: t.detach().requires_grad_() for n, t in weights.items() if t is not None}
    xin = x.detach().requires_grad_(case["x_grad"])
    if seed is not None:
        torch.manual_seed(seed)
    z, a, s = call(fn, xin, {n: leaves.get(n) for n in WEIGHT_NAMES},
                   activation=case["activation"], return_attention=True, return_scores=True,
                   **extra, **kwargs)
    outputs = {"z": z, "attention": a, "scores": s}
    loss = _loss(outputs, case["grads"], upstream)
    wrt = ([xin] if case["x_grad"] else []) + list(leaves.values())
    names = (["x"] if case["x_grad"] else []) + list(leaves)
    if not torch.is_tensor(loss):  # nothing used
        return outputs, {}
    got = torch.autograd.grad(loss, wrt, allow_unused=True)
    return outputs, dict(zip(names, got, strict=True))


@pytest.mark.parametrize("case", _cases())
def test_gradient_battery(case):
    backend = case["backend"]
    device = backend_device(backend)
    dtype = _dtype(case, device)
    skip_unsupported(backend, dtype, device)
    x64, w64, extra = _inputs(case, device)
    views = dict(zip(INPUTS, case["views"], strict=True))
    x = _view(x64.to(dtype), views["x"] and x64.dim() == 2)
    if views["x"] and x64.dim() == 3:
        x = x64.to(dtype).transpose(0, 1).contiguous().transpose(0, 1)  # batch stride inside
    weights = {n: _view(None if t is None else t.to(dtype), views[n]) for n, t in w64.items()}
    given = {n: _view(t, views[n]) for n, t in extra.items()}
    for name, t in {"x": x, **weights, **given}.items():  # the views are what they claim
        assert t is None or t.numel() <= 1 or t.is_contiguous() is not views[name], name
    # upstream values, one per output, in float64 and in each output's shape
    with torch.no_grad():
        shapes = [t.shape for t in attention_pool_reference(
            x64, *(w64[n] for n in INPUTS[1:4]), activation=case["activation"],
            return_attention=True, return_scores=True, **extra)]
    g = torch.Generator().manual_seed(3)
    upstream = {n: torch.randn(shape, generator=g, dtype=torch.float64).to(device)
                for n, shape in zip(OUTPUTS, shapes, strict=True)}
    upstream["z"] = upstream["z"].to(dtype).double()  # values z's gradient can hold exactly
    opts = dict(backend=backend, recompute=case["recompute"])
    if case["dropout"]:  # no oracle: the all-contiguous call with the same seed
        out, got = _run(fastmil.attention_pool, case, x, weights, given, upstream, seed=5,
                        dropout_p=0.3, **opts)
        want_out, want = _run(fastmil.attention_pool, case, x64.to(dtype),
                              {n: None if t is None else t.to(dtype) for n, t in w64.items()},
                              extra, upstream, seed=5, dropout_p=0.3, **opts)
    else:
        out, got = _run(fastmil.attention_pool, case, x, weights, given, upstream, **opts)
        # the oracle sees the values the call saw (rounded to dtype), in float64
        want_out, want = _run(attention_pool_reference, case, x.double(),
                              {n: None if t is None else t.double() for n, t in weights.items()},
                              extra, upstream)
    for name in OUTPUTS:  # (-inf scores at padded slots compared as a large finite value)
        assert_close(out[name].double().nan_to_num(neginf=-1e300),
                     want_out[name].double().nan_to_num(neginf=-1e300), dtype,
                     what=f"{name} {case}")
    assert set(got) == set(want), (sorted(got), sorted(want))
    for name, grad in got.items():
        ref = want[name]
        if ref is None:  # no output in the loss depends on it
            assert grad is None, f"d {name}: a gradient where the oracle has none"
            continue
        assert grad is not None, f"no gradient for {name} {case}"
        assert_close(grad, ref, dtype, what=f"d {name} {case}")


def test_issue_reproduction_packed_expanded_score_gradient():
    """The reported case: packed bags, the scores' gradient from ``.sum()`` (stride 0), on both
    backends, equal to the float64 oracle's to float32 rounding."""
    torch.manual_seed(0)
    T, D_, L_ = 14, 10, 6
    offsets = torch.tensor([0, 4, 5, 14])
    x = torch.randn(T, D_)
    V, U, w = torch.randn(L_, D_), torch.randn(L_, D_), torch.randn(L_)
    want = None
    for backend in ["reference", *BACKENDS]:
        device = "cpu" if backend == "reference" else backend_device(backend)
        leaves = [t.to(device, torch.float64 if backend == "reference" else t.dtype,
                       copy=True).requires_grad_() for t in (x, V, U, w)]
        fn = attention_pool_reference if backend == "reference" else fastmil.attention_pool
        kw = {} if backend == "reference" else {"backend": backend}
        z, s = fn(*leaves, offsets=offsets, return_scores=True, **kw)
        (z.sum() + s.sum()).backward()
        grads = [t.grad.cpu() for t in leaves]
        if want is None:
            want = grads
            continue
        for name, got, ref in zip("xVUw", grads, want, strict=True):
            assert_close(got, ref, torch.float32, what=f"{backend} d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_recompute_with_dropout_reuses_the_forward_masks(backend, layout):
    """recompute=True must make the backward with the forward's dropout masks, even when the
    random state has moved on in between: z bit-equal to recompute=False's under the same seed,
    and every gradient equal."""
    device = backend_device(backend)
    case = dict(layout=layout, K=2, gated=True, bias=True, activation="tanh", x_grad=True)
    x, weights, extra = _inputs(case, device)
    x = x.float()
    weights = clone_weights(weights, dtype=torch.float32, requires_grad=False)
    runs = []
    for recompute in (False, True):
        leaves = clone_weights(weights)
        xin = x.clone().requires_grad_()
        torch.manual_seed(123)
        z = call(fastmil.attention_pool, xin, leaves, dropout_p=0.5, recompute=recompute,
                 backend=backend, **extra)
        torch.rand(1000, device=device)  # the random state moves on before the backward
        torch.manual_seed(999)
        (z * torch.arange(z.numel(), device=device).reshape(z.shape)).sum().backward()
        runs.append((z.detach(), xin.grad, {n: t.grad for n, t in weight_tensors(leaves)}))
    (z0, gx0, g0), (z1, gx1, g1) = runs
    assert torch.equal(z0, z1)
    tol = dict(rtol=TOL[torch.float32]["rtol"], atol=1e-6)
    torch.testing.assert_close(gx1, gx0, **tol)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], **tol, msg=name)

