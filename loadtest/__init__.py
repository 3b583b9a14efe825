"""Load testing and benchmarks of mesh-serving (results in BENCHMARKS.md).

* ``mesh-loadtest`` (``loadtest.cli``, ``driver``, ``arrivals``, ``histogram``, ``scrape``,
  ``plot``): open- or closed-loop load against any KServe V2 gRPC endpoint;
* ``loadtest.scenarios``: one benchmark scenario per module (hop overhead, cold start, router
  memory, placement policies, peers side by side, ...), each starting what it measures on
  127.0.0.1 and stopping it by PID;
* ``loadtest.peers``: Ray Serve and MLServer in their own virtualenvs, for the side-by-side runs;
* ``loadtest.cluster``, ``models``, ``management``, ``report``: what the scenarios share.
"""
