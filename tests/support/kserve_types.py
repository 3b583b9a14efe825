"""KServe's own types for InferenceService, ServingRuntime, ClusterServingRuntime and InferenceGraph, to check test
objects, shipped manifests and our hand-written CRDs against (issue 16).

Why the SDK: KServe's CRD files may not be copied into this repository (docs/kserve-notes.md
section 0), but KServe's Python SDK on PyPI carries the same types as OpenAPI-generated classes,
one per Go struct, each with ``openapi_types`` (attribute -> type) and ``attribute_map`` (attribute
-> JSON name). ``kserve==0.12.0`` is the version modelmesh-serving pins (section 1). The nested
Kubernetes types (V1ObjectMeta, V1Container, ...) are the ``kubernetes`` client's models, which
carry the same two maps.

How it is read: both maps are literals in each generated file and are read with ``ast``, so
nothing of the wheel runs and none of its imports (six, urllib3, the model server behind
``kserve/__init__.py``) is needed. The wheel's ``kserve/models/`` is unpacked, its sha256 checked,
into :func:`sdk_dir` (beside the other test tools of tests/support/tool_cache.py) by
``python -m tests.support.kserve_types``, which scripts/install-test-deps runs. Without it,
:func:`validate` raises :class:`SdkMissing` saying so: tests fail, they do not skip.

What is checked: every field name exists at its path and every value has the declared JSON type
(``null`` counts as absent, as the API server drops it). Not checked: required fields, enums and
formats (the SDK has no enums; its required marks are the Go structs', which differ from the CRD's).
Errors name the path as the API server does: ``spec.containers[0].name``, ``metadata.labels[app]``.

Where the generated types do not say what the JSON holds, :data:`CORRECTIONS` corrects them, each
for a stated reason; tests/unit/test_kserve_schema.py checks an object that uses each of them.
The Kubernetes models are the installed client's (newer than KServe 0.12's Kubernetes), so nested
Kubernetes types may accept a field KServe 0.12's CRD does not yet have.
"""

from __future__ import annotations

import ast
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from tests.support.tool_cache import cache_dir

KSERVE_VERSION = "0.12.0"
_WHEEL = f"kserve-{KSERVE_VERSION}-py3-none-any.whl"
_WHEEL_SHA256 = "f0354e6ea8b3b7ca7a90cbded191843e004d9d09d2fc554397c168a40cbb72c8"  # PyPI's file
INSTALL_COMMAND = "scripts/install-test-deps (or: python -m tests.support.kserve_types)"

GROUP = "serving.kserve.io"
# kind -> (apiVersion, the SDK's root type)
KINDS: dict[str, tuple[str, str]] = {
    "InferenceService": (f"{GROUP}/v1beta1", "V1beta1InferenceService"),
    "ServingRuntime": (f"{GROUP}/v1alpha1", "V1alpha1ServingRuntime"),
    "ClusterServingRuntime": (f"{GROUP}/v1alpha1", "V1alpha1ClusterServingRuntime"),
    "InferenceGraph": (f"{GROUP}/v1alpha1", "V1alpha1InferenceGraph"),
}

# JSON shapes, besides the generated ones. "quantity": a Kubernetes resource.Quantity, int or string.
_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,), "datetime": (str,), "date": (str,), "int": (int,), "bool": (bool,), "float": (int, float),
    "quantity": (str, int, float)}
_NAMES = {"str": "a string", "datetime": "a date-time string", "date": "a date string", "int": "an integer",
          "bool": "a boolean", "float": "a number", "quantity": "a quantity (string or number)"}

# Types whose generated class is not what their JSON holds (or that the SDK lacks).
CORRECTIONS: dict[str, str | dict[str, str]] = {
    # knative.dev/pkg apis.URL marshals to a string; the generator described Go's url.URL struct.
    "KnativeURL": "str",
    # metav1.Time and knative's VolatileTime marshal to RFC 3339 strings.
    "V1Time": "datetime",
    "KnativeVolatileTime": "datetime",
    "ResourceQuantity": "quantity",
    # Referenced by V1beta1ComponentStatusSpec.traffic but not in the SDK: knative serving v1 TrafficTarget.
    "KnativeDevServingPkgApisServingV1TrafficTarget": {
        "tag": "str", "revisionName": "str", "configurationName": "str", "latestRevision": "bool",
        "percent": "int", "url": "str"},
    # The SDK's has only url; knative duck v1 Addressable, and KServe 0.12's CRD (docs/kserve-notes.md
    # section 1.3: status.address), also name, CACerts and audience.
    "KnativeAddressable": {"url": "str", "name": "str", "CACerts": "str", "audience": "str"},
}
# Kubernetes fields that are Quantities, which the kubernetes client types as plain strings.
_K8S_QUANTITIES = {
    ("V1ResourceRequirements", "limits"): "dict(str, quantity)",
    ("V1ResourceRequirements", "requests"): "dict(str, quantity)",
    ("V1VolumeResourceRequirements", "limits"): "dict(str, quantity)",
    ("V1VolumeResourceRequirements", "requests"): "dict(str, quantity)",
    ("V1EmptyDirVolumeSource", "sizeLimit"): "quantity",
}


class SdkMissing(RuntimeError):
    """KServe's SDK is not installed where the tests look for it."""


class UnknownType(LookupError):
    """A type name that neither the SDK, the corrections nor the kubernetes client defines."""


def sdk_dir() -> Path:
    return cache_dir() / f"kserve-sdk-{KSERVE_VERSION}"


# --- reading the types ------------------------------------------------------------------------

@cache
def _kserve_models(directory: Path) -> dict[str, dict[str, str]]:
    """Each SDK class in ``directory``: its JSON field name -> type name."""
    files = sorted(p for p in (directory / "kserve" / "models").glob("*.py") if p.name != "__init__.py")
    if not files:
        raise SdkMissing(f"KServe's Python SDK (kserve=={KSERVE_VERSION}) is not installed in {directory}: "
                         f"run {INSTALL_COMMAND}")
    out = {}
    for path in files:
        (cls,) = [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)]
        maps = {s.targets[0].id: ast.literal_eval(s.value) for s in cls.body if isinstance(s, ast.Assign)
                and isinstance(s.targets[0], ast.Name) and s.targets[0].id in ("openapi_types", "attribute_map")}
        out[cls.name] = {maps["attribute_map"][a]: t for a, t in maps["openapi_types"].items()}
    return out


def sdk_fields(type_name: str) -> dict[str, str] | None:
    """The SDK's own JSON fields of a class (before :data:`CORRECTIONS`), None if it has no such class."""
    return _kserve_models(sdk_dir()).get(type_name)


@cache
def _k8s_fields(type_name: str) -> dict[str, str]:
    model = getattr(k8s, type_name, None)
    if model is None or not hasattr(model, "attribute_map"):
        raise UnknownType(f"{type_name}: in neither KServe's SDK nor the kubernetes client")
    json_fields = {model.attribute_map[a]: t for a, t in model.openapi_types.items()}
    return {name: _K8S_QUANTITIES.get((type_name, name), t) for name, t in json_fields.items()}


def fields(type_name: str) -> dict[str, str] | None:
    """JSON field name -> type name of a model type; None for a type that is not an object."""
    shape = CORRECTIONS.get(type_name)
    if isinstance(shape, dict):
        return shape
    if shape is not None or type_name in _PRIMITIVES or type_name == "object" or _inner(type_name):
        return None  # not an object
    own = sdk_fields(type_name)
    return own if own is not None else _k8s_fields(type_name)


def _inner(type_name: str) -> tuple[str, str] | None:
    """("list", item type) or ("map", value type) for a container type, in both generators' spellings
    (the SDK's ``list[X]``/``dict(str, X)``, the kubernetes client's ``List[X]``/``Dict[str, X]``)."""
    low = type_name[:5].lower()
    if low == "list[":
        return "list", type_name[5:-1]
    if low in ("dict(", "dict["):
        return "map", type_name[5:-1].split(",", 1)[1].strip()
    return None


def _item(type_name: str) -> str:
    """The item type of a list type, the value type of a map type."""
    container = _inner(type_name)
    assert container is not None, type_name
    return container[1]


def shape_of(type_name: str) -> str:
    """The JSON type behind a type name: "list", "map", "object" (a model), "any", or a primitive's name."""
    shape = CORRECTIONS.get(type_name)
    if isinstance(shape, str):
        return shape
    container = _inner(type_name)
    if container is not None:
        return container[0]
    if type_name in _PRIMITIVES:
        return type_name
    if type_name == "object":
        return "any"
    fields(type_name)  # raises for an unknown type
    return "object"


def reachable_types() -> set[str]:
    """Every type name under the three kinds' roots; raises UnknownType for one that resolves nowhere
    (validate would raise on it instead of checking)."""
    seen: set[str] = set()
    todo = [root for _, root in KINDS.values()]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        shape = shape_of(name)
        if shape in ("list", "map"):
            todo.append(_item(name))
        elif shape == "object":
            todo += (fields(name) or {}).values()
    return seen


# --- checking objects ---------------------------------------------------------------------------

def _problems(value: Any, type_name: str, path: str) -> list[str]:
    if value is None:
        return []
    shape = shape_of(type_name)
    if shape == "any":
        return []
    if shape in _PRIMITIVES:
        ok = isinstance(value, _PRIMITIVES[shape]) and not (isinstance(value, bool) and shape != "bool")
        return [] if ok else [f"{path}: {_NAMES[shape]} expected, got {value!r}"]
    if shape == "list":
        if not isinstance(value, list):
            return [f"{path}: a list expected, got {value!r}"]
        item = _item(type_name)
        return [p for i, v in enumerate(value) for p in _problems(v, item, f"{path}[{i}]")]
    if not isinstance(value, dict):
        return [f"{path}: an object expected, got {value!r}"]
    if shape == "map":
        item = _item(type_name)
        return [p for k, v in value.items() for p in _problems(v, item, f"{path}[{k}]")]
    return _by_field(value, type_name, path, "not a field of", _problems)


def _by_field(members: dict[str, Any], type_name: str, path: str, unknown: str,
              check: Callable[[Any, str, str], list[str]]) -> list[str]:
    """``check(member, its type, its path)`` for each named member of an object of type ``type_name``;
    a name that is not a field there is the problem ``<path>: <unknown> <type_name>``."""
    known = fields(type_name) or {}
    problems = []
    for name, sub in members.items():
        where = f"{path}.{name}" if path else name
        problems += check(sub, known[name], where) if name in known else [f"{where}: {unknown} {type_name}"]
    return problems


def validator_for(kind: str) -> Callable[[dict[str, Any]], list[str]]:
    """A check of objects of one kind: the problems of an object (its apiVersion and kind, if given,
    must be the kind's). Raises KeyError for a kind that is not one of :data:`KINDS`."""
    api_version, root = KINDS[kind]

    def check(obj: dict[str, Any]) -> list[str]:
        if not isinstance(obj, dict):
            return [f"an object expected, got {obj!r}"]
        head = [f"{key}: {want!r} expected, got {obj[key]!r}"
                for key, want in (("apiVersion", api_version), ("kind", kind)) if obj.get(key, want) != want]
        return head + _problems(obj, root, "")

    return check


def validate(obj: dict[str, Any]) -> list[str]:
    """The problems of an InferenceService, ServingRuntime, ClusterServingRuntime or InferenceGraph
    against KServe's types (empty when it is well-formed); an object of another kind is one problem."""
    kind = obj.get("kind") if isinstance(obj, dict) else None
    if kind not in KINDS:
        return [f"kind: {kind!r} is not one of KServe's {', '.join(KINDS)}"]
    return validator_for(kind)(obj)


# --- checking a CRD's schema --------------------------------------------------------------------

# A structural schema's type -> the shapes of KServe's types it may stand for.
_SCHEMA_TYPES = {"string": {"str", "datetime", "date"}, "integer": {"int"}, "number": {"float"},
                 "boolean": {"bool"}, "array": {"list"}, "object": {"object", "map"}}


def schema_problems(schema: dict[str, Any], type_name: str, path: str = "") -> list[str]:
    """Where a CRD's structural schema declares what KServe's type ``type_name`` does not: a property
    that is not a field there, or another JSON type. What the schema leaves open (no properties,
    ``x-kubernetes-preserve-unknown-fields``) is not looked at."""
    shape = shape_of(type_name)
    if shape == "any":
        return []  # KServe takes anything here
    declared = schema.get("type")
    if shape == "quantity":
        ok = bool(schema.get("x-kubernetes-int-or-string"))
    else:
        ok = shape in _SCHEMA_TYPES.get(declared or "", set())
    if not ok:
        return [f"{path or '(root)'}: the CRD says {declared or 'no type'}, KServe says {type_name}"]
    problems = []
    if shape == "list" and isinstance(schema.get("items"), dict):
        problems += schema_problems(schema["items"], _item(type_name), f"{path}[*]")
    values = schema.get("additionalProperties")
    if isinstance(values, dict):
        if shape != "map":
            return [f"{path}: a map in the CRD, KServe's {type_name} is an object with named fields"]
        problems += schema_problems(values, _item(type_name), f"{path}[*]")
    properties = schema.get("properties") or {}
    if properties and shape != "object":
        return [f"{path}: the CRD names properties, KServe's {type_name} is a {shape}"]
    return problems + _by_field(properties, type_name, path, "declared by the CRD, not a field of KServe's",
                                schema_problems)


def crd_problems(crd: dict[str, Any]) -> list[str]:
    """:func:`schema_problems` of every version of a CRD of one of :data:`KINDS`."""
    kind = crd["spec"]["names"]["kind"]
    api_version, root = KINDS[kind]
    problems = []
    for version in crd["spec"]["versions"]:
        if f"{crd['spec']['group']}/{version['name']}" != api_version:
            problems.append(f"{kind} {version['name']}: KServe's {kind} is {api_version} only")
            continue
        problems += schema_problems(version["schema"]["openAPIV3Schema"], root)
    return problems


# --- installing the SDK -------------------------------------------------------------------------

def install() -> Path:
    """Download KServe's wheel with pip (no dependencies), check it, and unpack its generated models
    into :func:`sdk_dir` (replacing what is there; renamed into place, so never half there)."""
    target = sdk_dir()
    staging = target.with_name(f".{target.name}.partial")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--only-binary", ":all:", "--dest", tmp, f"kserve=={KSERVE_VERSION}"],
                       check=True, timeout=600, stdin=subprocess.DEVNULL)
        wheel = Path(tmp) / _WHEEL
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != _WHEEL_SHA256:
            raise SdkMissing(f"{_WHEEL} has sha256 {digest}, not {_WHEEL_SHA256}")
        shutil.rmtree(staging, ignore_errors=True)
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(staging, [n for n in archive.namelist() if n.startswith("kserve/models/")])
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    _kserve_models.cache_clear()
    return target


def installed() -> bool:
    return (sdk_dir() / "kserve" / "models").is_dir()


if __name__ == "__main__":
    print("kserve sdk:", sdk_dir() if installed() else install())
