"""How the kernels are launched: tiles, chunk sizes and the design options, as functions of the
shape and the device (never of bag lengths), and :func:`kernel_options` to set them for a scope.

Tiles are ``(BLOCK_N, BLOCK_D, BLOCK_L, num_warps, num_stages)`` per kernel kind:

* ``"fwd"``: the forward; BLOCK_D is the width of pass 2's x tiles (the weighted sum);
* ``"bwd"``: the backward; BLOCK_D is the width of the ``(h - z)·dz`` loop's x tiles.

Nothing here imports Triton: the backend chooses its launch before the kernels are touched.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import torch

__all__ = ["GPU_TILES", "INTERPRETER_TILES", "MEASURED_TILES", "TILE_CANDIDATES", "KernelOptions",
           "chunk_size", "kernel_options", "options", "pow2", "tile_key", "tiles"]

# Defaults per kind and dtype class: spill-free on sm_90 for every dtype, gating, mask, K and
# option with Triton 3.6 and 3.9 (``python tests/aot_compile.py``), per kernel, dtype class and
# branch count (one, or several). The 16-bit backward tile is the one that won in every class
# swept on an H100 (2026-11-26); several branches take a 16-bit forward tile of their own, the
# candidate that compiles without spills there for every mask and gate.
GPU_TILES = {
    ("fwd", "16-bit", 1): (64, 32, 64, 4, 3),
    ("fwd", "16-bit", 2): (128, 32, 64, 8, 3),
    ("fwd", "fp32", 1): (64, 32, 64, 4, 3),
    ("fwd", "fp32", 2): (64, 32, 64, 4, 3),
    ("bwd", "16-bit", 1): (16, 256, 64, 4, 3),
    ("bwd", "16-bit", 2): (16, 256, 64, 4, 3),
    ("bwd", "fp32", 1): (64, 32, 16, 8, 3),
    ("bwd", "fp32", 2): (64, 32, 16, 8, 3),
}
# What a tile sweep may pick (benchmarks/tile_sweep.py); tests run each in the interpreter and
# compile each for sm_90.
TILE_CANDIDATES = {
    "fwd": [(64, 32, 64, 4, 3), (64, 64, 64, 4, 3), (128, 32, 64, 8, 3), (128, 32, 64, 4, 3),
            (32, 64, 64, 4, 2), (64, 256, 64, 8, 3)],
    "bwd": [(64, 32, 16, 8, 3), (32, 64, 64, 8, 3), (64, 64, 64, 8, 3), (32, 128, 64, 8, 3),
            (32, 256, 64, 8, 3), (16, 256, 64, 4, 3)],
}
# Per class of calls, (kind, dtype class, gated, D class, L, K): the fastest spill-free tile of
# the sweep on an NVIDIA H100 80GB HBM3 (torch 2.11, Triton 3.6; GPU check c of 2026-11-26), with
# its speed-up over the default of that day.
MEASURED_TILES = {
    ("fwd", "16-bit", True, 1024, 256, 1): (64, 64, 64, 4, 3),  # wsi-d1024-l256-bf16 1.27x
    ("bwd", "16-bit", True, 1024, 256, 1): (16, 256, 64, 4, 3),  # wsi-d1024-l256-bf16 1.52x
    ("fwd", "fp32", True, 512, 128, 1): (64, 64, 64, 4, 3),  # mnist-d500-l128-fp32 1.22x
    ("bwd", "fp32", True, 512, 128, 1): (16, 256, 64, 4, 3),  # mnist-d500-l128-fp32 3.94x
    ("fwd", "16-bit", True, 2048, 256, 1): (64, 64, 64, 4, 3),  # wsi-d1536-l256-bf16 1.37x
    ("bwd", "16-bit", True, 2048, 256, 1): (16, 256, 64, 4, 3),  # wsi-d1536-l256-bf16 2.43x
    ("bwd", "16-bit", True, 1024, 256, 4): (64, 64, 64, 8, 3),  # clam-mb-d1024-l256-k4 1.55x
}
# Triton's interpreter runs one program at a time on numpy: wide tiles, few loop trips.
INTERPRETER_TILES = {"fwd": (32, 64, 128, 4, 1), "bwd": (32, 64, 128, 4, 1)}


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """The launch choices that are not a function of the shape alone.

    Attributes:
        tiles: kind -> tile, used instead of the table (tile sweeps, tests).
        chunk_rows: rows per chunk instead of :func:`chunk_size`'s (tests cut small bags into
            several chunks with it).
        single: one program per bag, without a merge, where every bag fits one chunk and the
            lengths are on the host (False runs the general path: tests).
        fma_sum: the forward's one-branch weighted sum by FMA into a ``[BLOCK_N, BLOCK_D]``
            register tile instead of ``tl.dot`` (which pads one real row to 16). Not yet timed
            on a GPU: the GPU check times it beside the default.
        programs_per_sm: programs per SM that the chunk size aims at.
        poison: fill every output buffer with NaN before a launch, so that an element a kernel
            forgets to write fails a comparison (tests).
        direct_launch: launch a compiled kernel without Triton's per-launch Python once its
            specialization has been seen (:mod:`fastmil.kernels.launch`); False always goes
            through ``JITFunction.run`` (benchmarks time both).
    """

    tiles: dict | None = None
    chunk_rows: int | None = None
    single: bool = True
    fma_sum: bool = False
    programs_per_sm: int = 4
    poison: bool = False
    direct_launch: bool = True


_DEFAULT = KernelOptions()
_OPTIONS: contextvars.ContextVar = contextvars.ContextVar("fastmil_kernel_options", default=None)


def options() -> KernelOptions:
    """The options in force."""
    return _OPTIONS.get() or _DEFAULT


@contextlib.contextmanager
def kernel_options(**changes):
    """Run the block with some :class:`KernelOptions` changed (the seam that tests, the tile
    sweep and the benchmarks use)::

        with kernel_options(fma_sum=True):
            z = fastmil.attention_pool(...)

    The choice is read when a call launches its kernels: a backward runs with the options of
    its forward (they are kept with the call)."""
    token = _OPTIONS.set(dataclasses.replace(options(), **changes))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def pow2(n: int, lo: int = 16) -> int:
    """The next power of two of n, at least lo (plain Python: triton.next_power_of_2 is a
    constexpr function that costs a microsecond and a half per call on the host)."""
    return max(lo, 1 << max(int(n) - 1, 0).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16-bit"


def tile_key(kind: str, dtype: torch.dtype, D: int, L: int, K: int, gated: bool) -> tuple:
    """The key of a class of calls in MEASURED_TILES: (kind, dtype class, gated, D class, L, K),
    the D class being D rounded up to a power of two (500 -> 512, 1536 -> 2048)."""
    return (kind, dtype_class(dtype), bool(gated), pow2(D), int(L), int(K))


def _table_tiles(kind, dtype, D, L, K, gated, cuda):
    if not cuda:
        return INTERPRETER_TILES[kind]
    found = MEASURED_TILES.get(tile_key(kind, dtype, D, L, K, gated))
    return found or GPU_TILES[(kind, dtype_class(dtype), min(K, 2))]


def tiles(kind, dtype, D, L, K, gated, cuda, opts=None, dropout=False):
    """(BLOCK_N, BLOCK_D, BLOCK_L, BLOCK_K, num_warps, num_stages) of one launch: the options'
    tile, else the measured or default GPU tile, else the interpreter's; BLOCK_D and BLOCK_L
    no wider than D and L need. With dropout a CUDA launch takes tiles of at most 32 attention
    columns (and 32 rows in the backward): the random numbers of two masks per tile spill
    registers otherwise."""
    opts = opts or options()
    override = opts.tiles.get(kind) if opts.tiles else None
    return _tiles(override and tuple(override), kind, dtype, D, L, K, gated, cuda, dropout)


@functools.lru_cache(maxsize=512)
def _tiles(override, kind, dtype, D, L, K, gated, cuda, dropout):
    tile = override or _table_tiles(kind, dtype, D, L, K, gated, cuda)
    block_n, block_d, block_l, num_warps, num_stages = tile
    if dropout and cuda:
        block_l = min(block_l, 32)
        block_n = min(block_n, 32) if kind == "bwd" else block_n
    return block_n, min(block_d, pow2(D)), min(block_l, pow2(L)), pow2(K), num_warps, num_stages


@functools.cache
def _multi_processors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


CHUNK_ALIGN = 128  # chunks are a multiple of this many rows (every BLOCK_N divides it)


def chunk_size(R: int, device: torch.device, opts=None) -> int:
    """Rows per chunk, from the row count and the device only: enough programs to fill the GPU
    (``programs_per_sm`` per SM), a multiple of CHUNK_ALIGN, at most 64·CHUNK_ALIGN rows."""
    opts = opts or options()
    if opts.chunk_rows is not None:
        return opts.chunk_rows
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        target = opts.programs_per_sm * _multi_processors(index)
    else:
        target = 8
    return max(1, min(64, cdiv(cdiv(max(R, 1), target), CHUNK_ALIGN))) * CHUNK_ALIGN
