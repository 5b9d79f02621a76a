"""Scheduler: restarts the HA VMs of a fenced host on the survivors."""
