"""Model storage (issue 14, in progress): storage keys and the resolution of a registration's
storage, by modelmesh-serving's contract (``config``). Providers, the disk cache and the pulls
come next; until then runtimes read local files only. Facts and measurements: docs/storage-notes.md."""
