"""Command-line layer: one module per tool (argument parsing + one library call), installed as console scripts.

Nothing here imports torch at package import: convert.py and merge.py set environment defaults and start
work before torch loads.
"""
