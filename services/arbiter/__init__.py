"""Arbiter: the only service that decides to fence."""
