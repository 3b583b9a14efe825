"""Registry records decode as they did before the per-class type table (``records._field_types``):
exact JSON types pass as they are, an int for a float becomes a float, a bool is never an int, a
wrong type or a missing required field is a ``BadRecord`` (counted), unknown fields are ignored."""

from __future__ import annotations

import json

import pytest

from mesh.errors import BadRecord
from mesh.registry.records import DeviceUsage, InstanceRecord, PlacementRecord, bad_records


def test_a_record_round_trips_and_ignores_fields_it_does_not_know() -> None:
    record = InstanceRecord(instance_id="i-1", endpoint="h:1", devices=(DeviceUsage("ram", 10, 4),),
                            labels=("a",), rate_rps=2.5, shutting_down=True, model_count=3)
    data = json.loads(record.to_json())
    data["a_newer_field"] = {"x": 1}
    assert InstanceRecord.from_json(json.dumps(data).encode()) == record


def test_an_int_for_a_float_becomes_a_float() -> None:
    raw = json.dumps({"model_id": "m", "instance_id": "i", "state": "LOADED", "load_ms": 20}).encode()
    decoded = PlacementRecord.from_json(raw)
    assert decoded.load_ms == 20.0 and type(decoded.load_ms) is float


@pytest.mark.parametrize("field, value", [
    ("size_bytes", True),  # a bool is not an int
    ("size_bytes", 1.5),
    ("load_ms", "20"),
    ("state", 3),
    ("model_id", None),
])
def test_a_wrong_type_is_a_bad_record_and_counted(field: str, value: object) -> None:
    data: dict[str, object] = {"model_id": "m", "instance_id": "i", "state": "LOADED", field: value}
    before = bad_records()
    with pytest.raises(BadRecord, match=field):
        PlacementRecord.from_json(json.dumps(data).encode())
    assert bad_records() == before + 1


def test_a_missing_required_field_or_a_non_object_is_a_bad_record() -> None:
    with pytest.raises(BadRecord):
        PlacementRecord.from_json(b'{"model_id": "m"}')
    with pytest.raises(BadRecord, match="JSON object"):
        InstanceRecord.from_json(b"[1, 2]")
    with pytest.raises(BadRecord, match="capacity_bytes"):  # inside a tuple of DeviceUsage
        InstanceRecord.from_json(b'{"instance_id": "i", "endpoint": "e", "devices": [{"device": "ram", '
                                 b'"capacity_bytes": "ram", "used_bytes": 0}]}')
