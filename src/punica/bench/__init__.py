"""Workloads and benchmark runners (the figures go to benchmarks/results/)."""
