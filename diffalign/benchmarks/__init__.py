"""Benchmarks behind ``diffalign bench``: ratios measured side by side in one run."""
