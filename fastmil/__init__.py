"""fastmil: fused attention-MIL pooling for variable-length bags.

Public API: :func:`attention_pool`, :class:`AttentionPool`, the bag utilities
:func:`pack`, :func:`pad`, :func:`unpad`, :func:`collate`, and the torchmil drop-in
:func:`patch_torchmil` / :func:`unpatch_torchmil`; CLAM's models and checkpoint key maps are in
:mod:`fastmil.integrations.clam`. The ground truth lives in :mod:`fastmil.reference`.
"""

from . import reference
from .bags import collate, pack, pad, unpad
from .functional import attention_pool
from .integrations.torchmil import patch_torchmil, unpatch_torchmil
from .module import AttentionPool

__version__ = "0.1.0"

__all__ = ["AttentionPool", "attention_pool", "collate", "pack", "pad", "patch_torchmil",
           "reference", "unpad", "unpatch_torchmil"]
