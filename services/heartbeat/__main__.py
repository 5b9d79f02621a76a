"""Heartbeat monitor: turns heartbeats into liveness events (suspect, alive)."""
import sys

from hafence.heartbeat.service import add_arguments, run
from hafence.service import service_main

sys.exit(service_main("heartbeat", run, add_arguments=add_arguments))
