"""fastmil: fused attention-MIL pooling for variable-length bags.

Public API: :func:`attention_pool`, :class:`AttentionPool`, and the bag utilities
:func:`pack`, :func:`pad`, :func:`unpad`, :func:`collate`. The ground truth lives in
:mod:`fastmil.reference`.
"""

from . import reference
from .bags import collate, pack, pad, unpad
from .functional import attention_pool
from .module import AttentionPool

__version__ = "0.1.0"

__all__ = ["AttentionPool", "attention_pool", "collate", "pack", "pad", "reference", "unpad"]
