"""The Kubernetes controller: Predictor custom resources -> vModels in the mesh, status written back.

``predictor`` (the mapping, pure), ``reconciler`` (the core), ``queue`` (work queue, back-off),
``kube`` (the only module importing ``kubernetes``), ``router_client`` (the management API over
gRPC), ``app`` (process assembly: ``mesh serve controller``).
"""
