import sys

from hafence.arbiter.service import run
from hafence.service import service_main

sys.exit(service_main("arbiter", run))
