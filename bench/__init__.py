"""The benchmark harness: `python -m bench` (or `broker bench`) writes BENCHMARKS.md. See bench/runner.py."""
