import sys

from hafence.scheduler.service import run
from hafence.service import service_main

sys.exit(service_main("scheduler", run))
