"""The gRPC edge shared by router and runtime: status mapping, servers, channels, the link to runtimes.

Which modules may import grpc is written in ``.importlinter`` and checked by machine; the logic
behind them is plain Python.
"""
