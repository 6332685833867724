"""Helpers shared by the test suite (the oracle comparisons, snapshots, models, the distributed harness)."""
