"""The hand-written TxnRequest bytes of ``create_many`` are exactly what aetcd's protobuf messages
serialize to for the same request (etcd reads the one as the other)."""

from __future__ import annotations

from aetcd import rpc

from mesh.registry.base import Create
from mesh.registry.etcd_wire import create_txn


def _message(items: list[Create]) -> bytes:
    ops = []
    for item in items:
        keys = [item.key.encode(), *(k.encode() for k in item.absent)]
        ops.append(rpc.RequestOp(request_txn=rpc.TxnRequest(
            compare=[rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=k, create_revision=0)
                     for k in keys],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=k.encode(), value=v))
                     for k, v in ((item.key, item.value), *item.also)],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=keys[0])),
                     *(rpc.RequestOp(request_range=rpc.RangeRequest(key=k, keys_only=True)) for k in keys[1:])])))
    return rpc.TxnRequest(success=ops).SerializeToString()


def test_create_txn_bytes_equal_the_protobuf_messages() -> None:
    items = [
        Create("/mesh/models/a", b'{"model_id":"a"}', absent=("/mesh/graphs/a",)),
        Create("/mesh/models/b%2Fc", b"x" * 300, absent=("/mesh/graphs/b%2Fc",), also=(("/mesh/pinned/b%2Fc", b"2"),)),
        Create("/k/\u00e9t\u00e9", b""),  # UTF-8 key, empty value (not written, as protobuf does)
        Create("/k/long", b"v" * 70_000, absent=("/g/1", "/g/2")),  # lengths over one varint byte
    ]
    assert create_txn(items) == _message(items)
    assert rpc.TxnRequest.FromString(create_txn(items)).success[1].request_txn.success[1].request_put.value == b"2"
