"""Model storage (issue 14): models in S3, GCS, Azure Blob, HTTP(S) and PVCs, by modelmesh-serving's
contract. ``location`` (is a registration's model in storage, and where), ``config`` (storage keys
and their resolution), ``providers`` (the clients), ``archives`` (safe unpacking), ``disk`` (the
runtime's disk cache), ``puller`` (all of it, for one load). Facts about modelmesh-serving:
docs/storage-notes.md."""
