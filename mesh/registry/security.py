"""etcd TLS and credentials, from the ``[registry]`` settings, checked once at start-up.

TLS is on when ``registry.ca_file`` is set (every endpoint then speaks TLS; etcd serves one scheme
per listener), with a client certificate when etcd runs with ``--client-cert-auth``. Credentials are
an etcd user and its password, which comes from ``registry.password`` (best set through the
environment, ``MESH_REGISTRY_PASSWORD``) or else ``registry.password_file`` (a mounted Secret).

The password lives in this object only, whose ``repr`` hides it; registry URLs never carry it
(``open_store`` refuses ``user:password@`` in a URL), so the URL can be logged as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mesh.errors import InvalidArgument
from mesh.pem import check_ca, check_cert_and_key
from mesh.settings import RegistrySettings


@dataclass(frozen=True)
class EtcdSecurity:
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return self.ca is not None


def etcd_security(rs: RegistrySettings) -> EtcdSecurity | None:
    """None when etcd is used in plaintext without authentication (the default)."""
    ca = cert = key = None
    if rs.ca_file:
        ca = check_ca("registry.ca_file", rs.ca_file)
        if rs.cert_file or rs.key_file:
            cert, key = check_cert_and_key("registry.cert_file", rs.cert_file, "registry.key_file", rs.key_file)
    elif rs.cert_file or rs.key_file:
        raise InvalidArgument("settings registry.cert_file/key_file need registry.ca_file (TLS to etcd is on "
                              "only with it)")
    password = rs.password
    if not password and rs.password_file:
        try:
            password = Path(rs.password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"setting registry.password_file: cannot read {rs.password_file}: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from None
    if bool(rs.username) != bool(password):
        raise InvalidArgument("settings registry.username and registry.password (or password_file) go "
                              "together: set both or neither")
    if ca is None and not rs.username:
        return None
    return EtcdSecurity(ca=ca, cert=cert, key=key, username=rs.username or None, password=password or None)
