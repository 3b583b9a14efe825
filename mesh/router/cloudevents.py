"""Payload records (``mesh.router.payloads``) as CloudEvents, in the two content modes a sink takes.

*Binary* (``router.payload_content_mode = "binary"``): one HTTP request per record, its attributes
as ``ce-*`` headers and the V2 protobuf message as the body. This is what KServe's logger and
ModelMesh's ``http`` payload processor send, so a sink written for either (a Knative broker,
KServe's message-dumper) takes it unchanged. Its cost is one HTTP exchange per record, on the
router and on the sink.

*Batched* (``"batched"``): one HTTP request carries many records, ``content-type:
application/cloudevents-batch+json``, a JSON array of structured-mode events (CloudEvents' JSON
format, "batch" section): the same attributes as JSON members without the ``ce-`` prefix, the body
base64 in ``data_base64`` (the bodies are protobuf, never JSON, so ``data`` is not used), its type in
``datacontenttype``. The exchange's cost is spread over the batch; encoding a record costs a small
JSON object and a base64 copy of its body.

The attributes are the same in both modes: ``specversion`` 1.0, ``type``
``org.kubeflow.serving.inference.request`` or ``.response``, ``id`` (shared by a request and its
response), ``source``, ``time`` (RFC 3339, UTC), KServe's extensions ``inferenceservicename``
(the vModel when the request named one, else the model), ``namespace``, ``component``
(``predictor``), ``endpoint`` (the model that answered), and ours: ``modelid``, ``vmodelid`` (only
for a vModel) and ``bodyomitted`` (the size of a body over ``router.payload_max_body_bytes``, sent
without it: a cut protobuf message would not parse).

Encoding is cheap by construction: the attributes every record of a sink shares are made once;
``time`` is formatted once a second; a batch is joined from per-record JSON bytes (orjson, which
escapes the client-chosen strings) and the base64 bodies, without building one large object first.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence

import orjson

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
CONTENT_TYPES = ("application/x-protobuf; proto=inference.ModelInferRequest",
                 "application/x-protobuf; proto=inference.ModelInferResponse")
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
CONTENT_MODES = ("binary", "batched")

# (is a response, ce-id, model ID, vModel ID or "", body, wall-clock time, size of a body left out
# or 0): a record as a sink queues it (mesh.router.payloads.Entry).
Entry = tuple[bool, str, str, str, bytes, float, int]


class Encoder:
    """One sink's CloudEvent encoder: the shared attributes made once."""

    def __init__(self, source: str, namespace: str) -> None:
        self.source, self.namespace = source, namespace
        self._second = -1
        self._second_text = ""

    def time(self, at: float) -> str:
        """RFC 3339 in UTC with microseconds; the date and time of day formatted once a second."""
        second = int(at)
        if second != self._second:
            self._second, self._second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((at - second) * 1e6):06d}Z"

    def binary(self, entry: Entry) -> tuple[dict[str, str], bytes]:
        """Binary content mode: the headers and the body of one record's request."""
        response, event_id, model_id, vmodel_id, body, at, omitted = entry
        headers = {
            "content-type": CONTENT_TYPES[response],
            "ce-specversion": "1.0",
            "ce-type": RESPONSE_TYPE if response else REQUEST_TYPE,
            "ce-id": event_id,
            "ce-source": self.source,
            "ce-time": self.time(at),
            "ce-inferenceservicename": vmodel_id or model_id,
            "ce-namespace": self.namespace,
            "ce-component": "predictor",
            "ce-endpoint": model_id,
            "ce-modelid": model_id,
        }
        if vmodel_id:
            headers["ce-vmodelid"] = vmodel_id
        if omitted:
            headers["ce-bodyomitted"] = str(omitted)
        return headers, body

    def attributes(self, entry: Entry) -> dict[str, str]:
        """A structured-mode event without its data: the JSON members of one record."""
        response, event_id, model_id, vmodel_id, _, at, omitted = entry
        event = {
            "specversion": "1.0",
            "type": RESPONSE_TYPE if response else REQUEST_TYPE,
            "id": event_id,
            "source": self.source,
            "time": self.time(at),
            "datacontenttype": CONTENT_TYPES[response],
            "inferenceservicename": vmodel_id or model_id,
            "namespace": self.namespace,
            "component": "predictor",
            "endpoint": model_id,
            "modelid": model_id,
        }
        if vmodel_id:
            event["vmodelid"] = vmodel_id
        if omitted:
            event["bodyomitted"] = str(omitted)
        return event

    def batch(self, entries: Sequence[Entry]) -> bytes:
        """Batched content mode: the body of one request carrying ``entries`` (a JSON array)."""
        parts = [b"["]
        for i, entry in enumerate(entries):
            head = orjson.dumps(self.attributes(entry))  # ends with "}": the data goes before it
            if i:
                parts.append(b",")
            parts.append(head[:-1])
            body = entry[4]
            if body:
                parts += (b',"data_base64":"', base64.b64encode(body), b'"}')
            else:
                parts.append(b"}")
        parts.append(b"]")
        return b"".join(parts)
