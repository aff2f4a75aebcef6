"""Benchmarks and synthetic full-size checkpoint generators (not part of the importable library).

Run through `make bench*` / `tools/bench_*.py`; each prints ratios against a baseline measured in the same run.
"""
