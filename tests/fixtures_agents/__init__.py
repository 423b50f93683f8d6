"""Agent classes used by the agent, supervisor and exactly-once tests (run in real processes)."""
