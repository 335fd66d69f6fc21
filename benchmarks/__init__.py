"""Benchmarks: ratios measured side by side in one run; results go into the README with their command."""
