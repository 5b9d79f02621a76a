import sys

from hafence.fencer.service import run
from hafence.service import service_main

sys.exit(service_main("fencer", run))
