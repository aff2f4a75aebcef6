"""Test and demo fixtures: tiny seeded parent models and tokenizers, tiny chat sets, the mergekit reference.

Nothing in the library imports this package; tests, `make demo` and the benchmarks do.
"""
