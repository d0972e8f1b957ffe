"""Offline analysis: read a base and its checkpoints, measure every metric, write the tables.

sources (lazy readers) -> engine (batched maths on one matrix group) -> analyze (the one entry) ->
summary (run-level values) -> markdown, outputs (files).
"""
