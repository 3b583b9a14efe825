"""Request signing for the test servers' own upload paths: AWS SigV4 and Azure SharedKey, stdlib only.

The object-store helpers (:mod:`tests.support.object_stores`) put objects through plain urllib
rather than the storage client under test (obstore), and the test environment cannot hold boto3:
every botocore wants python-dateutil < 3 and kubernetes 37 wants >= 3. Both signers are short
(SigV4's is ``loadtest.signing``'s) and follow the providers' published algorithms; the servers
that check them (moto, rclone, Azurite) are the proof, in tests/integration/test_object_stores.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import urllib.parse
from collections.abc import Mapping

from loadtest.signing import sigv4  # AWS SigV4 lives with the benchmarks, which sign their raw GETs too


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
    signature = base64.b64encode(hmac.new(base64.b64decode(key), to_sign.encode(), hashlib.sha256).digest()).decode()
    return f"SharedKey {account}:{signature}"


__all__ = ["shared_key", "sigv4"]
