"""CLAM (Lu et al. 2021, mahmoodlab/CLAM) with its pooling through fastmil: checkpoint key maps.

:func:`clam_to_fastmil_state_dict` and :func:`fastmil_to_clam_state_dict` rename the keys of
CLAM's attention net (``attention_net.3.attention_a.0.weight`` …) to those of a
:class:`fastmil.AttentionPool` (``attention_pool.attn.weight`` …) and back.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["clam_to_fastmil_state_dict", "fastmil_to_clam_state_dict"]

# CLAM's attention net (models/model_clam.py) -> AttentionPool's layers
_CLAM_GATED = {"attention_a.0": "attn", "attention_b.0": "gate", "attention_c": "score"}
_PARAMS = ("weight", "bias")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _rename(state_dict, renames):
    """A copy of ``state_dict`` with keys renamed by ``renames`` (old -> new), order kept;
    tensors are shared, not copied."""
    out = OrderedDict()
    for key, value in state_dict.items():
        out[renames.get(key, key)] = value
    return out


def clam_to_fastmil_state_dict(state_dict, *, attention_net: str = "attention_net.3",
                               pool: str = "attention_pool"):
    """Rename a CLAM ``state_dict``'s attention-net keys to those of a :class:`fastmil.AttentionPool`.

    CLAM's ``CLAM_SB`` / ``CLAM_MB`` keep their attention net (``Attn_Net_Gated`` or
    ``Attn_Net``) at index 3 of ``attention_net = nn.Sequential(Linear, ReLU, Dropout, net)``::

        attention_net.3.attention_a.0.{weight,bias}   ->  attention_pool.attn.{weight,bias}
        attention_net.3.attention_b.0.{weight,bias}   ->  attention_pool.gate.{weight,bias}
        attention_net.3.attention_c.{weight,bias}     ->  attention_pool.score.{weight,bias}
        attention_net.3.module.0.{weight,bias}        ->  attention_pool.attn.{weight,bias}    (Attn_Net)
        attention_net.3.module.{2|3}.{weight,bias}    ->  attention_pool.score.{weight,bias}   (Attn_Net)

    Every other key (``attention_net.0.*``, the classifiers …) is passed through unchanged.

    Args:
        state_dict: CLAM's ``model.state_dict()`` or a checkpoint of it.
        attention_net: the prefix of the attention net's keys (``""`` for a bare
            ``Attn_Net_Gated`` / ``Attn_Net`` state_dict).
        pool: the prefix of the fastmil ``AttentionPool``'s keys (``""`` to load into a bare
            ``AttentionPool``).

    Returns:
        A new ``OrderedDict`` sharing the tensors.
    """
    keys = set(state_dict)
    if _join(attention_net, "attention_a.0.weight") in keys:
        layers = dict(_CLAM_GATED)
    elif _join(attention_net, "module.0.weight") in keys:
        scores = [f"module.{i}" for i in (2, 3) if _join(attention_net, f"module.{i}.weight")
                  in keys]
        if len(scores) != 1:
            raise ValueError(f"state_dict has an Attn_Net at {attention_net!r} whose score "
                             f"layer must be module.2 (no dropout) or module.3 (dropout), got "
                             f"{scores or 'neither'}")
        layers = {"module.0": "attn", scores[0]: "score"}
    else:
        seen = sorted(k for k in keys if k.startswith(_join(attention_net, "")))[:6]
        raise ValueError(f"state_dict has no CLAM attention net at attention_net="
                         f"{attention_net!r}: expected the key "
                         f"{_join(attention_net, 'attention_a.0.weight')!r} (Attn_Net_Gated) "
                         f"or {_join(attention_net, 'module.0.weight')!r} (Attn_Net), found "
                         f"{seen or 'no key with that prefix'}")
    renames = {_join(attention_net, f"{theirs}.{p}"): _join(pool, f"{mine}.{p}")
               for theirs, mine in layers.items() for p in _PARAMS}
    return _rename(state_dict, renames)


def fastmil_to_clam_state_dict(state_dict, *, dropout=None,
                               attention_net: str = "attention_net.3",
                               pool: str = "attention_pool"):
    """The inverse of :func:`clam_to_fastmil_state_dict`: a fastmil ``AttentionPool``'s keys back
    to CLAM's attention net, every other key unchanged.

    Args:
        state_dict: the ``state_dict`` of the CLAM model whose pooling runs through fastmil.
        dropout: CLAM's ``dropout`` argument (truthy: its ``Attn_Net`` holds a Dropout, which
            moves the score layer from ``module.2`` to ``module.3``). Needed only for plain
            attention (a ``state_dict`` without ``{pool}.gate.weight``); gated attention
            ignores it.
        attention_net, pool: the key prefixes, as in :func:`clam_to_fastmil_state_dict`.

    Returns:
        A new ``OrderedDict`` sharing the tensors.
    """
    keys = set(state_dict)
    for layer in ("attn", "score"):
        for p in _PARAMS:
            if _join(pool, f"{layer}.{p}") not in keys:
                raise ValueError(f"state_dict has no key {_join(pool, f'{layer}.{p}')!r}: "
                                 f"expected a fastmil AttentionPool with biases (CLAM's layers "
                                 f"all carry one) under pool={pool!r}")
    if _join(pool, "gate.weight") in keys:
        layers = {mine: theirs for theirs, mine in _CLAM_GATED.items()}
    elif dropout is None:
        raise ValueError("dropout is None, but this AttentionPool is plain (no gate), i.e. "
                         "CLAM's Attn_Net, whose score layer is module.2 without dropout and "
                         "module.3 with it: pass dropout= as given to CLAM_SB / CLAM_MB")
    else:
        layers = {"attn": "module.0", "score": "module.3" if dropout else "module.2"}
    renames = {_join(pool, f"{mine}.{p}"): _join(attention_net, f"{theirs}.{p}")
               for mine, theirs in layers.items() for p in _PARAMS}
    return _rename(state_dict, renames)
