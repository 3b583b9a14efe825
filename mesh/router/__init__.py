"""The router: V2 data plane (gRPC and REST front ends), management API, view of the cluster."""
