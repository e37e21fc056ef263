"""fastmil's benchmark suite (``pytest benchmarks/``); see ``benchmarks/RESULTS.md``."""
