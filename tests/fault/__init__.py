"""Fault tests: loss under kills and cuts, and seeded fuzzing of RPC lines and broker frames."""
