"""Time limits of the tests' subprocesses.

A subprocess timeout only catches a hang: it is far above the slowest CPU's run time (CI itself
stops after 90 minutes), so no test passes or fails by how fast the machine is."""

HANG_GUARD_S = 3600
