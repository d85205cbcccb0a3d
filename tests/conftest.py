"""Fixtures used by more than one test module."""

from two_ranks import launch_stage  # noqa: F401 -- the two-process tests' stage launcher
