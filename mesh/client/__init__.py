"""Smart client (issue 18): follows the routers' route stream and sends inference straight to a
runtime holding the model, through the router on any doubt (``mesh.client.smart``, docs/client.md)."""

from mesh.client.smart import SmartClient

__all__ = ["SmartClient"]
