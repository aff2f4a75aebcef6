"""Evaluation: benchmark formats, greedy generation, metrics, results store, SWE-Bench ingest and reports."""
