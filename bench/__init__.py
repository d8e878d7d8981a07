"""Benchmarks run by ``make bench``; nothing in the shop imports this package."""
