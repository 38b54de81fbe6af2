"""Benchmarks: programs, not tests. Ratios measured side by side in one process."""
