"""Benchmarks: scripts that measure and print, never part of the test suite."""
