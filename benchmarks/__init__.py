"""Benchmarks: scripts that print figures and write them under benchmarks/results/.

Run as modules, e.g. ``python -m edgemed.benchmarks.convert_cost``. Each measured
configuration runs in its own process so its peak memory is its own.
"""
