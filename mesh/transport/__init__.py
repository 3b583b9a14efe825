"""The gRPC edge shared by router and runtime: status mapping, servers, channels.

Only modules under ``mesh/transport/`` and the ``servicer``/``forwarder``/``client`` modules of
each component import grpc; the logic behind them is plain Python (checked by a test).
"""
