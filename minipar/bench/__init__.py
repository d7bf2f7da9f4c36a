"""Benchmarks against torch's native implementations: `python -m minipar.bench.<topic>`.

Each prints the median step-time ratio (ours / torch) and peak memory. They are
commands, not tests: timing on a shared 2-core machine is too noisy to assert on.
"""
