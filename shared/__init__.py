"""hafence: fence-first high availability for KVM virtual machines.

This package (``shared/`` in the source tree) is the common library of the
services: contracts, subjects, bus, config, telemetry, store and leader lease.
"""

__version__ = "0.1.0"
