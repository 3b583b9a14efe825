"""Generated protobuf and gRPC stubs: run `python proto/generate.py`."""
