"""Benchmarks of the mesh against raw nats-py and FastStream: ``python -m benchmarks``.

Modules, one idea each:

- ``payload``: the request/event body (one pydantic model) and its exact wire sizes.
- ``systems``: the systems under test (raw-nats, faststream, mesh): echo callees, callers and
  event subscribers with one interface.
- ``callee``: ``python -m benchmarks.callee``, an echo callee in its own process (the ``-2proc``
  scenarios).
- ``loads``: the measurement loops (sequential, N in flight, events).
- ``footprint``: mesh-only scalars (start-to-ready, resident memory); ``python -m
  benchmarks.footprint`` is the child process whose memory is measured.
- ``propagation``: mesh-only policy propagation; ``python -m benchmarks.propagation`` is the
  child process running the registry, an admin client and N agents.
- ``stats``: percentiles and medians of rounds.
- ``machine``: what ran the benchmark (CPU, versions, date).
- ``report``: the JSON file, the markdown table and the PNG chart.
- ``runner``: the scenario list, interleaving of systems, rounds.
"""

SYSTEMS = ("raw-nats", "faststream", "mesh")
"""Systems measured, in report order."""

NOT_MEASURED = {
    "mesh-nosign": "the mesh has no mode without signing/sealing: every request is sealed "
    "and carries its certificate, every event is signed",
}
"""Scenarios or systems the spec names but the mesh cannot be measured on yet, with why."""
