"""The names of fastmil 0.1's ``fastmil.compat``, kept for code written against it: the torchmil
drop-in lives in :mod:`fastmil.integrations.torchmil`, the CLAM key maps in
:mod:`fastmil.integrations.clam`."""

from .integrations.clam import clam_to_fastmil_state_dict, fastmil_to_clam_state_dict
from .integrations.torchmil import patch_torchmil, torchmil_fallback_reason, unpatch_torchmil

__all__ = ["clam_to_fastmil_state_dict", "fastmil_to_clam_state_dict", "patch_torchmil",
           "torchmil_fallback_reason", "unpatch_torchmil"]
