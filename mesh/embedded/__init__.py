"""Embedded mode: `mesh up` and `mesh demo` on one machine, with a private etcd."""
