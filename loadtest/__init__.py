"""Benchmarks of mesh-serving against real processes on 127.0.0.1 (results in BENCHMARKS.md).

Each one starts what it measures (a private etcd, runtimes, a router; ``loadtest.cluster``),
drives it from this process, prints Markdown tables (``--json`` adds the raw results), stops every
process it started by PID, and finishes in about two minutes or less:

* ``python -m loadtest.hop``: the router's hop overhead (latency, CPU per request, throughput)
  against a direct call, a naive proxy and a bare echo server, with a py-spy profile;
* ``python -m loadtest.coldstart``: what a model's first request costs beyond its load, and
  exactly one load per cold model;
* ``python -m loadtest.router_memory``: router memory with 100,000 registered, unloaded models.
"""
