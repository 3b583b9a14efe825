"""Request signing for the test servers' own upload paths: AWS SigV4 and Azure SharedKey, stdlib only.

The object-store helpers (:mod:`tests.support.object_stores`) put objects through plain urllib
rather than the storage client under test (obstore), and the test environment cannot hold boto3:
every botocore wants python-dateutil < 3 and kubernetes 37 wants >= 3. Both signers are short and
follow the providers' published algorithms; the servers that check them (moto, rclone, Azurite)
are the proof, in tests/integration/test_object_stores.py.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import urllib.parse
from collections.abc import Mapping

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


def shared_key(method: str, url: str, headers: Mapping[str, str], *, content_length: int, account: str,
               key: str) -> str:
    """The ``Authorization`` value for an Azure Storage request signed with SharedKey (service
    version 2015-02-21 or later: a zero Content-Length is signed as empty). ``headers`` are those
    sent, ``x-ms-date`` and ``x-ms-version`` among them."""
    parts = urllib.parse.urlsplit(url)
    lowered = {name.lower(): value for name, value in headers.items()}
    standard = ["content-encoding", "content-language", "content-length", "content-md5", "content-type", "date",
                "if-modified-since", "if-match", "if-none-match", "if-unmodified-since", "range"]
    values = [str(content_length or "") if name == "content-length" else lowered.get(name, "") for name in standard]
    ms_headers = "".join(f"{name}:{lowered[name].strip()}\n" for name in sorted(lowered) if name.startswith("x-ms-"))
    # The resource is /account + the URL's path: an emulator's path-style URL repeats the account.
    resource = f"/{account}{parts.path}" + "".join(
        f"\n{name.lower()}:{value}" for name, value in sorted(urllib.parse.parse_qsl(parts.query)))
    to_sign = "\n".join([method, *values]) + "\n" + ms_headers + resource
    signature = base64.b64encode(_hmac(base64.b64decode(key), to_sign)).decode()
    return f"SharedKey {account}:{signature}"
