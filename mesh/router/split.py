"""Traffic splits of vModels (canaries): which target a request goes to, and what a split may be.

A vModel with a split (``VModelRecord.split``) shares its requests among up to
``MAX_SPLIT_TARGETS`` models by integer weights summing to 100, e.g. 90 to the stable model and 10
to a canary. The choice is made per request on the hot path from the router's view alone:

* With the vModel's ``sticky_header`` present in the request, its value is hashed (BLAKE2b, not
  Python's ``hash()``, which is salted per process) onto the cumulative weights: one user (one
  header value) stays on one target across requests, routers and restarts, and many users spread
  over the targets in proportion to the weights. Changing the weights moves only the users whose
  point falls in the part of the line that changed owner.
* Without it (no sticky header set, or the request lacks it), a uniform random draw.

A target of weight 0 is referred to (it stays registered) and loaded when the split is set, but
gets no traffic (KServe's ``canaryTrafficPercent: 0``); once evicted it is left to on-demand
loading like any idle model: only targets with a weight are loaded again by the routers
(``drive_transitions``), so a split cannot pin copies outside the ``max_pinned_copies`` quota.

A target whose load has failed (as the vModel transition judges it: ``load_failed``) gets no
traffic: its share goes to the vModel's ``active`` model, the stable one, until the failure records
expire or the split changes. A target that is merely not loaded yet does get its share (the first
requests wait for its load, as for any model loaded on demand); setting a split starts the loads at
once, and ``sync`` waits for them, so a split set with ``sync`` serves its first canary requests
from a loaded copy.

Requests per (vModel, target) are counted in the view for ``mesh_vmodel_requests_total``, only
with ``per_model_metrics`` on (its series grow with the vModels tenants split, as every per-model
label does), and only for inference (``choose(count=True)``): metadata and readiness resolve through
the split without counting. A front end resolves a request once and reuses the choice (REST V1
predict reads the model's metadata and then infers: both go to the one target chosen).

The sticky header is read only for the request's own split vModel (the REST edge reads it from the
raw request headers then, never every split's header from every request); a value that cannot be
used (not printable ASCII, too long) falls back to the random draw, never a rejection. A sticky
header may not be a credential or a header the transports own (``authorization``, ``cookie``,
``content-type``, ...): those are stripped before a runtime, logged nowhere, and hashing a
credential onto a split would make it a routing input.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Sequence

from mesh.errors import InvalidArgument
from mesh.logging import header
from mesh.registry import records
from mesh.registry.records import SplitTarget, VModelRecord, quarantine
from mesh.router.routing import MAX_LOAD_FAILURES
from mesh.router.view import ClusterView
from mesh.transport.metadata import LOAD_MODE, MODEL_ID, VMODEL_ID

MAX_SPLIT_TARGETS = records.MAX_SPLIT_TARGETS
TOTAL_WEIGHT = records.TOTAL_WEIGHT
MAX_HEADER_CHARS = records.MAX_STICKY_HEADER_CHARS
MAX_HEADER_VALUE = 1024  # a longer sticky value is not used: a random draw instead
# An HTTP header token, lower-case (gRPC metadata keys are); not binary (-bin), not the transport's
# own (grpc-*, pseudo-headers), not the model selection itself.
_HEADER = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
# Credentials and the headers HTTP and the transports own: never a routing input (module docstring).
# Holds the data plane's STRIP set (tests/unit/test_vmodel_split.py checks it).
_RESERVED = frozenset({
    MODEL_ID, VMODEL_ID, MODEL_ID + "-bin", VMODEL_ID + "-bin", LOAD_MODE,
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "x-auth-token",
    "www-authenticate", "proxy-authenticate", "user-agent", "host", "content-type", "content-length",
    "content-encoding", "transfer-encoding", "te", "trailer", "connection", "keep-alive", "upgrade",
    "accept", "accept-encoding", "expect", "referer", "origin", "forwarded", "x-forwarded-for",
    "inference-header-content-length"})
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")

Headers = Iterable[tuple[str, str | bytes]]


def check_sticky_header(vmodel_id: str, name: str) -> str:
    """The header name as stored (lower-case); InvalidArgument naming the problem otherwise."""
    low = name.strip().lower()
    if not low:
        return ""
    if (len(low) > MAX_HEADER_CHARS or not _HEADER.match(low) or low.endswith("-bin")
            or low.startswith("grpc-") or low in _RESERVED):
        raise InvalidArgument(f"vModel {vmodel_id!r}: stickyHeader {name[:80]!r} is not a usable header name "
                              f"(letters, digits, '-', '_', '.'; at most {MAX_HEADER_CHARS} characters; "
                              "not binary (-bin), grpc-*, mm-*, a credential such as authorization or "
                              "cookie, or a standard HTTP header such as user-agent or content-type)")
    return low


def check_split(vmodel_id: str, targets: Sequence[tuple[str, int]]) -> tuple[SplitTarget, ...]:
    """The split as stored, or InvalidArgument naming the target (by position and ID) at fault.
    Whether each target is registered is the caller's check (it needs the registry)."""
    if not targets:
        raise InvalidArgument(f"vModel {vmodel_id!r}: a split needs at least one target")
    if len(targets) > MAX_SPLIT_TARGETS:
        raise InvalidArgument(f"vModel {vmodel_id!r}: a split has at most {MAX_SPLIT_TARGETS} targets, "
                              f"not {len(targets)}")
    seen: set[str] = set()
    for i, (model_id, weight) in enumerate(targets):
        if model_id in seen:
            raise InvalidArgument(f"vModel {vmodel_id!r}: targets[{i}] {model_id!r} is named twice")
        seen.add(model_id)
        if isinstance(weight, bool) or not 0 <= weight <= TOTAL_WEIGHT:
            raise InvalidArgument(f"vModel {vmodel_id!r}: targets[{i}] {model_id!r} has weight {weight}; "
                                  f"a weight is 0 to {TOTAL_WEIGHT}")
    total = sum(w for _, w in targets)
    if total != TOTAL_WEIGHT:
        raise InvalidArgument(f"vModel {vmodel_id!r}: the weights sum to {total}, not {TOTAL_WEIGHT}")
    return tuple(SplitTarget(m, w) for m, w in targets)


def bucket(value: str) -> int:
    """A stable point in [0, 100) for a sticky header value: the same on every router and after
    restarts (BLAKE2b; the modulo bias over 64 bits is below 1e-17)."""
    digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % TOTAL_WEIGHT


def load_failed(view: ClusterView, model_id: str) -> bool:
    """Whether ``model_id`` failed to load for good, as the vModel transitions judge a target:
    quarantined (a runtime died loading it), or failure records on ``MAX_LOAD_FAILURES``
    instances (or on every instance, in a smaller fleet)."""
    failures = view.failures.get(model_id)
    if not failures:
        return False
    return (quarantine(failures) is not None
            or len(failures) >= min(MAX_LOAD_FAILURES, max(len(view.instances), 1)))


def pick(record: VModelRecord, point: int) -> str:
    """The target whose part of the cumulative weights holds ``point`` (0 <= point < 100)."""
    for target in record.split:
        point -= target.weight
        if point < 0:
            return target.model_id
    return record.split[-1].model_id  # only for a record whose weights do not sum to 100


def usable(value: str | bytes | None) -> str | None:
    """A sticky header value as hashed, or None (a random draw) for one that cannot be used."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if value is None or len(value) > MAX_HEADER_VALUE or not _PRINTABLE.match(value):
        return None
    return value


def choose(record: VModelRecord, view: ClusterView, metadata: Headers, rng: random.Random,
           count: bool = True) -> str:
    """The concrete model for one request to a vModel with a split (``count``: an inference,
    counted in the view when per-model metrics are on)."""
    value = usable(header(metadata, record.sticky_header)) if record.sticky_header else None
    point = bucket(value) if value is not None else rng.randrange(TOTAL_WEIGHT)
    model_id = pick(record, point)
    if model_id != record.active_model_id and load_failed(view, model_id):
        model_id = record.active_model_id  # a failed canary's share goes to the stable model
    if count and view.count_splits:
        view.count_split_request(record.vmodel_id, model_id)
    return model_id


def receiving(record: VModelRecord, view: ClusterView) -> dict[str, bool]:
    """For the status: whether each split target gets traffic now (False: its load failed)."""
    return {t.model_id: t.model_id == record.active_model_id or not load_failed(view, t.model_id)
            for t in record.split}
