import sys

from hafence.heartbeat.service import run
from hafence.service import service_main

sys.exit(service_main("heartbeat", run))
