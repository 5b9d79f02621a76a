"""Heartbeat monitor: turns heartbeats into liveness events (suspect, alive)."""
