"""Bag utilities: convert between lists of bags, the packed layout and the padded layout.

* packed: ``x [T, D]`` with ``offsets [B+1]`` (bag b is ``x[offsets[b]:offsets[b+1]]``), the
  native layout of fastmil and the same convention as FlashAttention's ``cu_seqlens``;
* padded: ``x [B, N, D]`` with ``mask [B, N]`` (True = real instance).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["pack", "pad", "unpad", "collate", "lengths_to_offsets", "check_offsets_values",
           "derived", "segment_ids"]


def derived(t: torch.Tensor) -> dict:
    """A dict for what is derived from the values of ``t`` (a batch's offsets: that they were
    checked, its chunk map), kept with ``t`` (as an attribute of the tensor object) until ``t``
    is changed in place (its version counter moves) or freed. A batch's layout is so worked out
    once, not once per call."""
    entry = getattr(t, "_fastmil_derived", None)
    if entry is None or entry[0] != t._version:
        entry = (t._version, {})
        t._fastmil_derived = entry
    return entry[1]


def check_offsets_values(offsets, total):
    """Raise a ValueError unless offsets start at 0, never decrease and end at ``total``.
    CPU offsets are checked through numpy (a few µs: this runs on every call of a training
    loop); GPU offsets cost one device sync when they are fine. The details only on failure."""
    if offsets.numel() == 0:
        raise ValueError("offsets must hold B+1 >= 1 values, got an empty tensor")
    if offsets.device.type == "cpu":
        o = offsets.numpy()
        if o[0] == 0 and o[-1] == total and bool((o[1:] >= o[:-1]).all()):
            return
    steps = offsets[1:] - offsets[:-1]
    if offsets.device.type != "cpu" and bool(
            (offsets[0] == 0) & (offsets[-1] == total) & (steps >= 0).all()):
        return
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0:
        raise ValueError(f"offsets must start at 0, got offsets[0] = {first}")
    if bool((steps < 0).any()):
        bad = int(torch.nonzero(steps < 0)[0, 0])
        raise ValueError(f"offsets must be non-decreasing, but offsets[{bad + 1}] = "
                         f"{int(offsets[bad + 1])} < offsets[{bad}] = {int(offsets[bad])}")
    raise ValueError(f"offsets must end at x.shape[0] = {total} (T), got offsets[-1] = {last}")


def segment_ids(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """Bag index of every packed row: bag lengths [B] -> [T] int64 (no host sync)."""
    bags = torch.arange(lengths.shape[0], device=lengths.device)
    return torch.repeat_interleave(bags, lengths, output_size=total)


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """Bag lengths [B] -> offsets [B+1] int64, starting at 0."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def pack(bags: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate bags ``[n_b, D]`` into ``x [T, D]`` and ``offsets [B+1]`` (int64)."""
    if isinstance(bags, torch.Tensor) or not isinstance(bags, Sequence) or len(bags) == 0:
        raise ValueError("bags must be a non-empty list of [n, D] tensors")
    first = bags[0]
    for i, bag in enumerate(bags):
        if not isinstance(bag, torch.Tensor) or bag.dim() != 2:
            shape = tuple(bag.shape) if isinstance(bag, torch.Tensor) else type(bag).__name__
            raise ValueError(f"bags[{i}] must be a 2-D [n, D] tensor, got {shape}")
        if bag.shape[1] != first.shape[1]:
            raise ValueError(f"bags[{i}] has D = {bag.shape[1]} but bags[0] has D = "
                             f"{first.shape[1]}; all bags must share the feature size")
        if bag.dtype != first.dtype or bag.device != first.device:
            raise ValueError(f"bags[{i}] is {bag.dtype} on {bag.device} but bags[0] is "
                             f"{first.dtype} on {first.device}")
    lengths = torch.tensor([bag.shape[0] for bag in bags], dtype=torch.int64)
    return torch.cat(list(bags)), lengths_to_offsets(lengths).to(first.device)


def pad(x: torch.Tensor, offsets: torch.Tensor, *, value: float = 0.0
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed ``x [T, D]``, ``offsets [B+1]`` -> padded ``x [B, N, D]`` (N = longest bag, padding
    filled with ``value``) and ``mask [B, N]`` bool."""
    if x.dim() != 2:
        raise ValueError(f"x must be packed [T, D], got shape {tuple(x.shape)}")
    if offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(f"offsets must be 1-D [B+1], got shape {tuple(offsets.shape)}")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"offsets must be int32 or int64, got {offsets.dtype}")
    check_offsets_values(offsets, x.shape[0])
    offsets = offsets.to(torch.int64)
    lengths = offsets[1:] - offsets[:-1]  # [B]
    B = lengths.shape[0]
    N = int(lengths.max()) if B > 0 else 0
    positions = torch.arange(N, device=x.device)
    mask = positions[None, :] < lengths[:, None]  # [B, N]
    out = x.new_full((B, N, x.shape[1]), value)
    out[mask] = x  # row-major order of mask matches the packed order
    return out, mask


def unpad(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ``x [B, N, D]`` with ``mask [B, N]`` -> packed ``x [T, D]`` and ``offsets [B+1]``.
    Real instances keep their order within each bag."""
    if x.dim() != 3 or mask.shape != x.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(f"need x [B, N, D] and a bool mask [B, N], got x {tuple(x.shape)} and "
                         f"mask {tuple(mask.shape)} {mask.dtype}")
    return x[mask], lengths_to_offsets(mask.sum(1)).to(x.device)


def collate(batch):
    """``DataLoader`` collate for ``(bag [n, D], label)`` items -> ``(x [T, D], offsets [B+1],
    labels [B])``, bags packed in batch order."""
    if len(batch) == 0:
        raise ValueError("collate got an empty batch")
    bags, labels = zip(*batch, strict=True)
    x, offsets = pack(list(bags))
    if isinstance(labels[0], torch.Tensor):
        labels = torch.stack(list(labels))
    else:
        labels = torch.as_tensor(labels)
    return x, offsets, labels
