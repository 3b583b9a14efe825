"""etcd's ``TxnRequest`` for ``create_many``, written as protobuf wire bytes directly.

A group of 126 nested create-if-absent transactions is about a thousand small protobuf messages;
building them as message objects (``aetcd.rpc``) was a third of the router's CPU per item of a bulk
registration. The bytes are the same as ``TxnRequest(...).SerializeToString()`` gives for the same
request (``tests/unit/test_etcd_wire.py`` compares them); ``EtcdStore.create_many`` sends them with
a bytes-in, ``TxnResponse``-out call of the same ``etcdserverpb.KV/Txn`` method.

Field numbers are etcd's ``rpc.proto`` (3.5): TxnRequest compare=1 success=2 failure=3;
RequestOp request_range=1 request_put=2 request_txn=4; Compare target=2 key=3 create_revision=5;
PutRequest key=1 value=2; RangeRequest key=1 keys_only=8.
"""

from __future__ import annotations

from collections.abc import Sequence

from mesh.registry.base import Create

TXN_METHOD = "/etcdserverpb.KV/Txn"
_CREATE_TARGET = b"\x10\x01"  # Compare.target = CREATE (result EQUAL = 0 is the default: not written)
_CREATE_REVISION_ZERO = b"\x28\x00"  # Compare.create_revision = 0 (the oneof set, as aetcd sets it)
_KEYS_ONLY = b"\x40\x01"  # RangeRequest.keys_only = true


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_TAGS = {number: _varint(number << 3 | 2) for number in (1, 2, 3, 4)}  # length-delimited, one byte each
_SHORT = [bytes((n,)) for n in range(128)]  # a length under 128 is one byte


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (bytes, string or message) numbered 1 to 4."""
    n = len(payload)
    return _TAGS[number] + (_SHORT[n] if n < 128 else _varint(n)) + payload


def _absent(key: bytes) -> bytes:
    return _field(1, _CREATE_TARGET + _field(3, key) + _CREATE_REVISION_ZERO)


def _put(key: bytes, value: bytes) -> bytes:
    return _field(2, _field(2, _field(1, key) + (_field(2, value) if value else b"")))


def _read(key: bytes, keys_only: bool) -> bytes:
    return _field(3, _field(1, _field(1, key) + (_KEYS_ONLY if keys_only else b"")))


def create_op(item: Create) -> bytes:
    """One item as ``RequestOp(request_txn=...)``: its key and guard keys absent, then put it and its
    companions; else read the key and (keys only) the guards."""
    key = item.key.encode()
    guards = [k.encode() for k in item.absent]
    inner = b"".join([
        _absent(key), *(_absent(g) for g in guards),
        _put(key, item.value), *(_put(k.encode(), v) for k, v in item.also),
        _read(key, False), *(_read(g, True) for g in guards)])
    return _field(4, inner)


def create_txn(items: Sequence[Create]) -> bytes:
    """``TxnRequest(success=[create_op(item) ...])``, no compares: every item is its own transaction."""
    return b"".join(_field(2, create_op(item)) for item in items)
