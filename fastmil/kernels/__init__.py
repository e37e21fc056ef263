"""fastmil's Triton kernels (:mod:`.attention_pool`), their launch choices (:mod:`.config`) and
direct launcher (:mod:`.launch`); imported by the Triton backend on its first call."""
