"""The simulated lab: power switches, hypervisors and a launcher for the demo,
the end-to-end tests and the benchmarks. Nothing here runs in production."""
