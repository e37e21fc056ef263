"""The eager baseline: the padded formulation most MIL code runs today (ABMIL, CLAM, torchmil,
MIL-Lab): two ``Linear`` layers, a masked softmax over the instance axis, a ``bmm``. The speed
baseline of every benchmark."""

from __future__ import annotations

import torch

from fastmil.reference import scores


def eager_attention_pool(x, attn_weight, gate_weight, score_weight, *, attn_bias=None,
                         gate_bias=None, score_bias=None, mask=None, activation="tanh",
                         return_attention=False):
    """The padded formulation most MIL code uses (ABMIL, CLAM, torchmil, MIL-Lab).

    x: [B, N, D], mask: [B, N] bool or None, score_weight: [L] or [K, L].
    Returns z [B, D] (or [B, K, D]) and, on request, attention [B, N] (or [B, N, K]).
    Masked slots get the dtype's most negative value, as in MIL-Lab, so an all-masked bag gives
    uniform weights over its padding rather than NaN (fastmil itself gives zeros there).
    """
    single_branch = score_weight.dim() == 1
    w = score_weight[None, :] if single_branch else score_weight
    bw = None if score_bias is None else score_bias.reshape(w.shape[0])
    s = scores(x, attn_weight, gate_weight, w, attn_bias, gate_bias, bw, activation)  # [B, N, K]
    if mask is not None:
        s = s.masked_fill(~mask[..., None], torch.finfo(s.dtype).min)
    a = torch.softmax(s, dim=1)  # [B, N, K]
    z = torch.bmm(a.transpose(1, 2), x)  # [B, K, D]
    if single_branch:
        z, a = z.squeeze(1), a.squeeze(-1)
    return (z, a) if return_attention else z
