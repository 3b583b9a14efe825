"""AWS Signature Version 4 for plain HTTP clients, standard library only.

The raw-HTTP baseline of the storage benchmarks (``loadtest.scenarios.storage_clients``) signs its
GETs with this, and so do the test servers' upload paths (``tests.support.request_signing``):
the test environment cannot hold botocore (every botocore wants python-dateutil < 3, kubernetes 37
wants >= 3). The servers that check it (moto, rclone) are the proof, in
tests/integration/test_object_stores.py.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import urllib.parse

_UNRESERVED = "-_.~"


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def sigv4(method: str, url: str, *, body: bytes, key_id: str, secret: str, region: str, service: str,
          now: datetime.datetime | None = None) -> dict[str, str]:
    """Headers that sign ``method url`` with AWS Signature Version 4 (``x-amz-date``,
    ``x-amz-content-sha256``, ``Authorization``). ``url``'s path must already be percent-encoded as
    it will be sent (S3 signs it as is)."""
    stamp = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%dT%H%M%SZ")
    parts = urllib.parse.urlsplit(url)
    payload = hashlib.sha256(body).hexdigest()
    signed = {"host": parts.netloc, "x-amz-content-sha256": payload, "x-amz-date": stamp}
    names = sorted(signed)
    query = "&".join(sorted(
        f"{urllib.parse.quote(name, safe=_UNRESERVED)}={urllib.parse.quote(value, safe=_UNRESERVED)}"
        for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)))
    canonical = "\n".join([method, parts.path or "/", query, "".join(f"{name}:{signed[name]}\n" for name in names),
                           ";".join(names), payload])
    scope = f"{stamp[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = f"AWS4{secret}".encode()
    for part in (stamp[:8], region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return {"x-amz-content-sha256": payload, "x-amz-date": stamp,
            "Authorization": f"AWS4-HMAC-SHA256 Credential={key_id}/{scope}, SignedHeaders={';'.join(names)}, "
                             f"Signature={signature}"}


__all__ = ["sigv4"]
