"""fastmil under MIL code that already runs: :mod:`.torchmil` (a drop-in patch of torchmil's
``AttentionPool``) and :mod:`.clam` (CLAM's checkpoints and models with fastmil pooling).
Neither imports its library until used."""
