import sys

from hafence.agent.service import add_arguments, run
from hafence.service import service_main

sys.exit(service_main("agent", run, add_arguments=add_arguments))
