"""Reading ``model_name`` (field 1) from a serialized ModelInferRequest without decoding it.

The router forwards inference requests as bytes; when no header names the model it needs only
field 1, so it walks the top-level fields (varint tags, skipping values by wire type) until it
finds it, and never touches the tensors. Malformed bytes raise ``InvalidArgument``; a request
without field 1 gives "".
"""

from __future__ import annotations

from mesh.errors import InvalidArgument


def read_varint(buf: bytes | memoryview, pos: int, what: str = "request") -> tuple[int, int]:
    """(value, next position) of the protobuf varint at ``pos``; InvalidArgument naming ``what``
    when it is cut short or longer than 64 bits (the graph runner's splicing reads with it too)."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise InvalidArgument(f"{what} is malformed: a truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise InvalidArgument(f"{what} is malformed: a varint too long")


def read_model_name(buf: bytes) -> str:
    pos, end = 0, len(buf)
    name = ""
    while pos < end:
        tag, pos = read_varint(buf, pos)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            _, pos = read_varint(buf, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 2:
            length, pos = read_varint(buf, pos)
            if pos + length > end:
                raise InvalidArgument("malformed request: field longer than the message")
            if field == 1:
                try:
                    name = buf[pos:pos + length].decode("utf-8")  # the last occurrence wins, as in protobuf
                except UnicodeDecodeError:
                    raise InvalidArgument("malformed request: model_name is not valid UTF-8") from None
            pos += length
        elif wire_type == 5:
            pos += 4
        else:
            raise InvalidArgument(f"malformed request: unsupported wire type {wire_type}")
        if field == 0:
            raise InvalidArgument("malformed request: field number 0")
    if pos > end:
        raise InvalidArgument("malformed request: truncated field")
    return name
