"""Host agent: heartbeats, VM inventory, and VM start/stop on command."""
