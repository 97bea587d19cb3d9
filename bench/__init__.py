"""Benchmarks of the broker path against same-run baselines (see bench/README.md).

Every script starts and reaps its own simulator, broker and client processes, prints a
small table and writes ``bench/results/<name>.json``; ``--quick`` is a smoke run.
"""
