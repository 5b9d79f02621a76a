"""The deterministic simulation's foundation: a virtual clock and an in-memory NATS.

* ``clock``: virtual time, timers, tasks and per-node clocks (offset, drift, jumps);
* ``subjects``: NATS subject matching (``*`` and ``>``);
* ``streams``: JetStream storage, de-duplication, limits, consumers, KV on a stream;
* ``transport``: the simulated server and client connections: links with latency,
  core pub/sub, queue groups, request/reply, JetStream and KV over the network,
  and the faults (loss, lost acks, a node cut off, NATS restart, bucket loss);
* ``ports``: the ``Delivery`` protocol that nats-py messages and simulated ones share.

Nothing here reads real time or global randomness: one seed, one run.
"""
