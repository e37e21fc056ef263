"""Shared fixtures and helpers of the fastmil test suite.

Everything here is backend-agnostic: tests take the ``backend`` fixture (or parametrize over
:data:`BACKENDS`) and pass it to :func:`fastmil.attention_pool`, so the same tests run against
every backend listed in :data:`BACKENDS`. They build their tensors and modules on the ``device``
fixture (:func:`backend_device`): CUDA for the triton backend on a machine with a GPU, else the
CPU.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. The variable is
# read when the kernels are decorated, i.e. when fastmil first imports its kernel module, which
# happens after this line.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastmil

CUDA = torch.cuda.is_available()

# The backends the generic tests run on: both, wherever Triton is installed (on CPU its kernels
# run in the interpreter; skip_unsupported skips the dtypes a backend cannot take there).
# FASTMIL_TEST_BACKENDS=torch (or =triton) narrows the run to one.
_DEFAULT_BACKENDS = "torch,triton" if importlib.util.find_spec("triton") else "torch"
BACKENDS = [b for b in os.environ.get("FASTMIL_TEST_BACKENDS", _DEFAULT_BACKENDS).split(",") if b]

# Layouts of attention_pool's x: padded [B, N, D] without / with mask, packed [T, D] + offsets,
# and a single bag [N, D].
LAYOUTS = ("padded", "padded_mask", "packed", "single")

# Tolerances of a backend against fastmil.reference.attention_pool_reference, per input dtype.
# ``atol`` is relative to the scale of the expected tensor (see assert_close), ``rtol`` is
# elementwise. Do not widen these to make a test pass: investigate the failure.
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}

WEIGHT_NAMES = ("attn_weight", "gate_weight", "score_weight", "attn_bias", "gate_bias",
                "score_bias")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
if ROOT not in sys.path:  # the tests of benchmarks/ import it as a package
    sys.path.insert(0, ROOT)


def child_env(*paths: str, compiled: bool = False, **extra: str) -> dict[str, str]:
    """The environment of a test's subprocess (an example, torchrun, pytest): this one without
    torchrun's variables, fastmil importable from any working directory (the repository and
    ``paths`` first on PYTHONPATH, each absolute: a relative ``PYTHONPATH=.`` would point at the
    child's own cwd), and ``extra`` set. ``compiled``: without TRITON_INTERPRET, for a child
    that compiles the kernels for a GPU (Triton's NVIDIA compiler, a stand-in driver)."""
    drop = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
            *(("TRITON_INTERPRET",) if compiled else ()))
    env = {k: v for k, v in os.environ.items() if k not in drop}
    old = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*map(os.path.abspath, paths), ROOT, *old])
    env.update(extra)
    return env


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run inside it, by name (``counts``)."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def backend_device(backend):
    """The device the tests of ``backend`` put their tensors and modules on: "cuda" for
    backend="triton" on a machine with a GPU (the compiled kernels take CUDA tensors only), else
    "cpu" (the torch backend, and the triton backend in Triton's interpreter)."""
    return "cuda" if backend == "triton" and CUDA else "cpu"


@pytest.fixture
def device(backend):
    """:func:`backend_device` of the test's backend."""
    return backend_device(backend)


def skip_unsupported(backend, dtype, device=None):
    """Skip the test where ``backend`` cannot run ``dtype`` on ``device`` (default: the backend's
    :func:`backend_device`), e.g. float64 or, in Triton's CPU interpreter, bfloat16 on
    backend="triton", with the backend's own reason."""
    if backend in ("torch", "auto"):
        return
    device = backend_device(backend) if device is None else device
    why = getattr(fastmil.triton_backend, f"{backend}_unavailable_reason", None)
    reason = None if why is None else why(torch.empty(0, dtype=dtype, device=device))
    if reason is not None:
        pytest.skip(f"backend={backend!r}: {reason}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tests of many tiny ops otherwise crawl when another
    process holds a core (threads wait on each other), and gain nothing from a second one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_usage_error(main, argv, message, prog, capsys):
    """``main(argv)`` fails as argparse does on a bad flag: exit status 2, ``message`` and the
    ``usage: prog`` line on stderr, and no traceback."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and f"usage: {prog}" in err and "Traceback" not in err, err


def assert_close(actual, expected, dtype=None, *, what=""):
    """``actual`` ≈ ``expected`` within TOL[dtype] (default: expected's dtype).

    Both are compared in float64. The absolute tolerance is ``atol * max(1, max|expected|)``, so
    that large outputs (x * 1e4, gradients summed over 1000 instances) are held to a relative
    standard rather than an absolute one.
    """
    dtype = expected.dtype if dtype is None else dtype
    tol = TOL[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.detach().double(), expected.detach().double()
    scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
    torch.testing.assert_close(a, e, rtol=tol["rtol"], atol=tol["atol"] * scale,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def make_weights(D, L, K=None, gated=True, bias=True, dtype=torch.float32, *, scale=1.0,
                 requires_grad=False, device="cpu"):
    """Random attention weights as a dict of WEIGHT_NAMES -> tensor or None.

    ``K=None`` gives a 1-D score_weight [L] (one branch, score_bias [1]); an int K gives
    score_weight [K, L] and score_bias [K]. ``gated=False`` gives gate_weight = gate_bias = None,
    ``bias=False`` gives no biases. V and U are scaled so that V h is O(1) for h ~ N(0, 1);
    ``scale`` multiplies every weight and bias.
    """
    def rnd(*shape, std=1.0):
        t = (torch.randn(*shape, dtype=torch.float64) * std * scale).to(device=device,
                                                                          dtype=dtype)
        return t.requires_grad_(requires_grad)

    w = {
        "attn_weight": rnd(L, D, std=D ** -0.5),
        "gate_weight": rnd(L, D, std=D ** -0.5) if gated else None,
        "score_weight": rnd(L) if K is None else rnd(K, L),
        "attn_bias": rnd(L, std=0.5) if bias else None,
        "gate_bias": rnd(L, std=0.5) if bias and gated else None,
        "score_bias": rnd(1 if K is None else K) if bias else None,
    }
    return w


def weight_tensors(weights):
    """The non-None weights, in WEIGHT_NAMES order, as (name, tensor) pairs."""
    return [(n, weights[n]) for n in WEIGHT_NAMES if weights[n] is not None]


def call(fn, x, weights, **kwargs):
    """Call attention_pool (or a reference function with its signature) with a weights dict."""
    return fn(x, weights["attn_weight"], weights["gate_weight"], weights["score_weight"],
              attn_bias=weights["attn_bias"], gate_bias=weights["gate_bias"],
              score_bias=weights["score_bias"], **kwargs)


def make_bags(lengths, D, dtype=torch.float32, *, scale=1.0, device="cpu"):
    """A list of random bags [n_b, D], one per entry of ``lengths``."""
    return [(torch.randn(n, D, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
            for n in lengths]


def make_layout(layout, lengths, D, dtype=torch.float32, *, scale=1.0, spare=0, device="cpu"):
    """Random bags of the given lengths in one of LAYOUTS.

    Returns ``(x, kwargs)`` where kwargs holds ``mask`` or ``offsets`` as the layout needs.
    "padded" needs equal lengths, "single" exactly one length; "padded_holes" is "padded_mask"
    with each bag's real instances scattered among its padding. Padding slots are filled with
    random (finite) garbage, not zeros, so that a backend which reads them gets caught; the
    masked layouts get ``spare`` padding slots beyond the longest bag.
    """
    bags = make_bags(lengths, D, dtype, scale=scale, device=device)
    if layout == "single":
        assert len(lengths) == 1, "single layout takes exactly one bag"
        return bags[0], {}
    if layout == "padded":
        assert len(set(lengths)) <= 1, "padded layout without mask needs equal bag lengths"
        N = lengths[0] if lengths else 0
        return torch.stack(bags) if bags else torch.zeros(0, N, D, dtype=dtype, device=device), {}
    x, offsets = fastmil.pack(bags) if bags else (
        torch.zeros(0, D, dtype=dtype, device=device),
        torch.zeros(1, dtype=torch.int64, device=device))
    if layout == "packed":
        return x, {"offsets": offsets}
    if layout in ("padded_mask", "padded_holes"):
        xp, mask = fastmil.pad(x, offsets)
        if spare:
            xp = torch.cat([xp, xp.new_zeros(xp.shape[0], spare, D)], 1)
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], spare)], 1)
        if layout == "padded_holes":  # each bag's real instances scattered among its padding
            order = torch.argsort(torch.rand(mask.shape), dim=1).to(mask.device)
            xp, mask = xp.gather(1, order[..., None].expand_as(xp)), mask.gather(1, order)
        garbage = (torch.randn(xp.shape, dtype=torch.float64) * scale).to(xp)
        xp = torch.where(mask[..., None], xp, garbage)
        return xp, {"mask": mask}
    raise ValueError(f"unknown layout {layout!r}")


# Bag lengths per layout: 0, 1, odd and large (1000) bags, mixed where the layout allows it.
LENGTHS = {
    "single": [[0], [1], [7], [1000]],
    "padded": [[0, 0], [1, 1, 1], [7, 7], [1000, 1000], []],
    "padded_mask": [[3, 0, 1, 7, 1000], [0, 0], [1], [5, 2, 5]],
    "packed": [[3, 0, 1, 7, 1000], [0, 0], [1], [5, 2, 5], []],
}


def layout_cases():
    """pytest params (layout, lengths) over LENGTHS, with readable ids."""
    return [pytest.param(layout, lengths, id=f"{layout}-{'_'.join(map(str, lengths)) or 'B0'}")
            for layout, cases in LENGTHS.items() for lengths in cases]


def clone_weights(weights, *, dtype=None, requires_grad=True):
    """Detached copies of a weights dict (optionally cast), as fresh autograd leaves."""
    out = {}
    for name, t in weights.items():
        if t is None:
            out[name] = None
            continue
        t = t.detach().clone() if dtype is None else t.detach().to(dtype)
        out[name] = t.requires_grad_(requires_grad)
    return out


def grads(out, upstream, inputs):
    """Gradients of ``sum(out * upstream)`` w.r.t. ``inputs``: zeros when ``out`` depends on no
    input at all (a batch of zero bags); an input that ``out`` does not reach fails, so that a
    backend which drops a gradient (the score bias's exact zero, say) is caught, not padded."""
    if not out.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    gs = torch.autograd.grad(out, inputs, upstream, allow_unused=True)
    missing = [i for i, g in enumerate(gs) if g is None]
    assert not missing, f"no gradient reached inputs {missing} of {len(inputs)}"
    return list(gs)
