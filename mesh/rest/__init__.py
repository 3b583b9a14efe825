"""The router's REST front end: Open Inference Protocol REST (with Triton's binary tensors) and
KServe V1, over the same data plane as gRPC (``mesh.router.dataplane``)."""
