"""Benchmarks: each prints JSON, every figure beside a baseline measured in the same run."""
