"""modelmesh-serving's ``model-serving-config`` ConfigMap, key by key, into our settings.

modelmesh-serving reads the YAML under the ConfigMap's ``config.yaml`` key, keys case-insensitive
(viper), nested ones as mappings (``restProxy: {port: 8008}``; named here ``restProxy.port``).
``RULES`` lists every key it knows (docs/kserve-notes.md section 6) with one of three outcomes:

- a **setting**: written into a ``mesh.toml`` fragment, each line under a comment naming its source;
- **use deploy/ instead**: what it configured is a manifest here (a Service, a volume, a pod
  template), and the note says which and how to change it;
- **not supported**: the note says why, and what comes closest.

A key the table does not know is a warning, not silence: a typo would otherwise pass as a default.
A value of the wrong type is an error naming the key and the type expected. The result is what the
user reads, so every key given yields a line: a setting, a note or a warning.

Pure: the caller passes the file's bytes. The input is bounded (``MAX_BYTES``) before YAML parses it,
and values are checked only to the fixed depth the table expects, never walked, printed or copied
beyond it: an alias bomb (a small document whose aliases expand to a huge tree) costs what its text
costs. The table is also the documentation: docs/migrating-from-modelmesh.md, "Your
model-serving-config", lists the same keys and defaults (tests/unit/test_modelmesh_config.py).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml  # type: ignore[import-untyped]  # PyYAML ships no annotations; only safe_load is used

from mesh.compat.shapes import (
    Check,
    Reader,
    boolean,
    entries,
    fields,
    integer,
    items,
    show,
    string,
    string_list,
    string_map,
    wrong,
)
from mesh.controller.runtimes import SERVER_TYPES, UNSUPPORTED_SERVER_TYPES
from mesh.errors import InvalidArgument
from mesh.router.payloads import parse_processors
from mesh.settings import Settings

MAX_BYTES = 1024 * 1024
PKI = "/etc/mesh-pki"  # where deploy/base mounts each pod's certificate (Secret mesh-<component>-tls)


class Outcome(enum.Enum):
    SETTING = "setting"
    DEPLOY = "use deploy/ instead"
    UNSUPPORTED = "not supported"
    INFO = "note"
    WARNING = "warning"


@dataclass(frozen=True)
class Note:
    key: str  # as the input spells it
    outcome: Outcome
    text: str

    def __str__(self) -> str:
        if self.outcome is Outcome.WARNING:
            return f"warning: {self.key}: {self.text}"
        if self.outcome in (Outcome.SETTING, Outcome.INFO):
            return f"{self.key}: {self.text}"
        return f"{self.key}: {self.outcome.value}: {self.text}"


@dataclass
class Conversion:
    """The settings (``{"router.port": 8033}``), the comment above each, and the notes, in table order
    (warnings first)."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    notes: list[Note] = field(default_factory=list)

    def tables(self) -> dict[str, dict[str, Any]]:
        """The settings by group, as ``load_settings(overrides=...)`` takes them."""
        tables: dict[str, dict[str, Any]] = {}
        for setting, value in self.values.items():
            group, _, name = setting.partition(".")
            tables.setdefault(group, {})[name] = value
        return tables

    def toml(self) -> str:
        lines = ["# From modelmesh-serving's model-serving-config by `mesh config from-modelmesh`: merge these",
                 "# tables into mesh.toml (deploy/base/mesh.toml); `mesh settings` explains every key."]
        defaults = Settings()
        for group_field in dataclasses.fields(defaults):
            group = group_field.name
            names = [f.name for f in dataclasses.fields(getattr(defaults, group))
                     if f"{group}.{f.name}" in self.values]
            if names:
                lines += ["", f"[{group}]"]
            for name in names:
                setting = f"{group}.{name}"
                lines += [f"# {self.sources[setting]}", f"{name} = {_toml(self.values[setting])}"]
        return "\n".join(lines) + "\n"


class _Context(Reader):
    def __init__(self) -> None:
        super().__init__()
        self.given: dict[str, tuple[str, Any]] = {}  # rule key -> (spelling, checked value)
        self.out = Conversion()
        self.key = ""  # the key being applied, as the input spells it
        self.rule = ""  # and as RULES does

    def value(self, key: str, default: Any = None) -> Any:
        return self.given[key][1] if key in self.given else default

    def set(self, setting: str, value: Any) -> None:
        self.out.values[setting] = value
        self.out.sources[setting] = f"from {self.key}: {show(self.value(self.rule))}"
        self.out.notes.append(Note(self.key, Outcome.SETTING, f"{setting} = {_toml(value)}"))

    def note(self, outcome: Outcome, text: str) -> None:
        self.out.notes.append(Note(self.key, outcome, text))


Apply = Callable[[Any, _Context], None]


@dataclass(frozen=True)
class Rule:
    key: str  # as modelmesh-serving's docs spell it, nested keys dotted
    default: str  # modelmesh-serving's default, as docs/kserve-notes.md section 6 gives it
    outcome: Outcome  # SETTING, DEPLOY or UNSUPPORTED: the doc table's "what we do"
    check: Check
    apply: Apply | str  # text: a note of the rule's outcome
    settings: tuple[str, ...] = ()  # the settings it may write


_QUANTITY = fields(cpu=string, memory=string)
_IMAGE = fields(name=string, tag=string, digest=string, command=string_list)
_RESOURCES = fields(requests=_QUANTITY, limits=_QUANTITY)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else "\\" + c if c in '"\\' else c
                             for c in value) + '"'
    return "[" + ", ".join(_toml(v) for v in value) + "]"


# -- what each key does ---------------------------------------------------------------------------------

_MANAGED_ONLY = ("used for runtimes the controller manages (controller.manage_runtimes = true); deploy/base's "
                 "mesh-runtime StatefulSet has its own replicas (3)")


def _setting(name: str, also: str = "") -> Apply:
    def apply(value: Any, ctx: _Context) -> None:
        ctx.set(name, value)
        if also:
            ctx.note(Outcome.INFO, also)
    return apply


def _named(default: str, same: str, other: str) -> Apply:
    """A name deploy/ gives a manifest: ``same`` if the value is ``default``, else how to change it
    (``other``, with ``{value}``)."""
    def apply(value: str, ctx: _Context) -> None:
        if value == default:
            ctx.note(Outcome.INFO, same)
        else:
            ctx.note(Outcome.DEPLOY, other.format(value=show(value)))
    return apply


def _switch(settings: tuple[str, ...], on: str) -> Apply:
    """An ``enabled``: true is what we do by default (``on`` says so), false turns ``settings`` off (-1)."""
    def apply(value: bool, ctx: _Context) -> None:
        if value:
            ctx.note(Outcome.INFO, on)
            return
        for setting in settings:
            ctx.set(setting, -1)
    return apply


def _port(settings: tuple[str, ...], switch: str, default: int, where: str) -> Apply:
    """A port, unless its ``switch`` (an ``enabled`` key) is false; another than ``default`` is also a
    change to deploy/ (``where``)."""
    def apply(value: int, ctx: _Context) -> None:
        if switch and ctx.value(switch, True) is False:
            ctx.note(Outcome.INFO, f"ignored: {switch} is false")
            return
        for setting in settings:
            ctx.set(setting, value)
        if value != default:
            ctx.note(Outcome.DEPLOY, f"change {default} to {value} in {where}")
    return apply


def _tls_secret(value: str, ctx: _Context) -> None:
    if not value:
        ctx.note(Outcome.INFO, "empty: the routers serve plaintext, as ours do by default")
        return
    ctx.set("tls.cert_file", f"{PKI}/tls.crt")
    ctx.set("tls.key_file", f"{PKI}/tls.key")
    ctx.set("controller.router_ca_file", f"{PKI}/ca.crt")
    ctx.note(Outcome.DEPLOY, f"the routers serve TLS (8033 and 8008) with their certificate in Secret mesh-router-tls "
             f"(deploy/base/pki.yaml, mounted at {PKI}), not {show(value)}: add the names clients dial "
             "(modelmesh-serving...) to its dnsNames and give clients the CA in Secret mesh-ca, or mount your Secret "
             "in deploy/base/router.yaml and point tls.cert_file and tls.key_file at it")
    ctx.note(Outcome.DEPLOY, f"the controller then dials the routers over TLS: mount the CA at {PKI} in "
             "deploy/base/controller.yaml (controller.router_ca_file)")


def _client_auth(value: str, ctx: _Context) -> None:
    mode = value.strip().lower()
    if mode not in ("", "require", "optional"):
        raise InvalidArgument(f"{ctx.key}: expected require, optional or empty, got {show(value)}")
    if mode and not ctx.value("tls.secretName"):
        ctx.note(Outcome.INFO, "ignored: tls.secretName is empty, so there is no TLS (as in modelmesh-serving)")
    elif mode == "require":
        ctx.set("tls.client_auth", "require")
        ctx.set("tls.client_ca_file", f"{PKI}/ca.crt")
        ctx.set("controller.router_cert_file", f"{PKI}/tls.crt")
        ctx.set("controller.router_key_file", f"{PKI}/tls.key")
        ctx.note(Outcome.DEPLOY, "clients need a certificate signed by the mesh CA (Secret mesh-ca; modelmesh-serving "
                 "trusted the TLS Secret's own certificates): point tls.client_ca_file at your CA otherwise; give "
                 f"the controller a client certificate (deploy/base/pki.yaml) mounted at {PKI}")
    elif mode == "optional":
        ctx.set("tls.client_auth", "none")
        ctx.note(Outcome.UNSUPPORTED, "optional client certificates: none are asked for (tls.client_auth = none); "
                 "use require, or bearer tokens (auth.tokens_file)")
    else:
        ctx.note(Outcome.INFO, "empty: no client certificates, as ours by default (tls.client_auth = none)")


def _metrics_scheme(value: str, ctx: _Context) -> None:
    scheme = value.strip().lower()
    if scheme not in ("http", "https"):
        raise InvalidArgument(f"{ctx.key}: expected http or https, got {show(value)}")
    if scheme == "http":
        ctx.note(Outcome.INFO, "/metrics is served over http, as here")
    else:
        ctx.note(Outcome.UNSUPPORTED, "/metrics is served over plain http; deploy/base/network.yaml limits who may "
                 "scrape it (namespaces labelled mesh-serving.io/monitoring: \"true\")")


def _server_types(value: list[str], ctx: _Context) -> None:
    refused = sorted({v.lower() for v in value} & set(UNSUPPORTED_SERVER_TYPES))
    text = (f"the server types are fixed: a ServingRuntime's builtInAdapter.serverType may be "
            f"{', '.join(SERVER_TYPES)}; {', '.join(UNSUPPORTED_SERVER_TYPES)} are refused")
    ctx.note(Outcome.UNSUPPORTED, text + (f" (yours lists {', '.join(refused)})" if refused else ""))


def _payload_processors(value: list[str], ctx: _Context) -> None:
    if not value:
        ctx.note(Outcome.INFO, "none, as here")
        return
    parse_processors(value)  # InvalidArgument naming the URI, as the router would at start
    ctx.set("router.payload_processors", tuple(value))
    ctx.note(Outcome.INFO, "the same URIs (http(s)://, logger://, ?model, #method); records are CloudEvents in "
             "binary content mode as model-mesh sends them (router.payload_content_mode = batched sends many per "
             "POST, for sinks that take CloudEvents batches)")


_METRICS = ("router.metrics_port", "runtime.metrics_port")
_NO_PROXY = "there is no REST proxy container: the routers serve REST themselves"
_NO_PULLER = "there is no puller container: runtimes pull models themselves (the storage.* settings)"

RULES: tuple[Rule, ...] = (
    Rule("inferenceServiceName", "modelmesh-serving", Outcome.DEPLOY, string, _named(
        "modelmesh-serving", "deploy/base/router.yaml already has the Service modelmesh-serving (8033 gRPC, 8008 "
        "REST) in front of the routers", "rename the Service modelmesh-serving in deploy/base/router.yaml to "
        "{value} (metadata.name)")),
    Rule("inferenceServicePort", "8033", Outcome.SETTING, integer(1, 65535), _port(
        ("router.port",), "", 8033, "deploy/base/router.yaml (both Services, the containerPort grpc, the probes) "
        "and in MESH_CONTROLLER_ROUTER_ENDPOINT (deploy/base/controller.yaml)"), ("router.port",)),
    Rule("storageSecretName", "storage-config", Outcome.DEPLOY, string, _named(
        "storage-config", "deploy/base/runtime.yaml mounts the Secret storage-config at /storage-config "
        "(storage.config_dir), in the same format", "deploy/base/runtime.yaml mounts the Secret storage-config at "
        "/storage-config (storage.config_dir): set that volume's secretName to {value}, or copy your Secret as "
        "storage-config")),
    Rule("podsPerRuntime", "2", Outcome.SETTING, integer(1, 65535),
         _setting("controller.pods_per_runtime", _MANAGED_ONLY), ("controller.pods_per_runtime",)),
    Rule("tls.secretName", '""', Outcome.SETTING, string, _tls_secret,
         ("tls.cert_file", "tls.key_file", "controller.router_ca_file")),
    Rule("tls.clientAuth", '""', Outcome.SETTING, string, _client_auth,
         ("tls.client_auth", "tls.client_ca_file", "controller.router_cert_file", "controller.router_key_file")),
    Rule("headlessService", "true", Outcome.DEPLOY, boolean,
         "the modelmesh-serving Service (deploy/base/router.yaml) has a cluster IP that balances "
         "connections over the routers; add clusterIP: None to it for a headless one"),
    Rule("grpcMaxMessageSizeBytes", "16777216", Outcome.SETTING, integer(1, 2**31 - 1),
         _setting("router.max_message_bytes"), ("router.max_message_bytes",)),
    Rule("enableAccessLogging", "false", Outcome.SETTING, boolean, _setting("log.access_log"), ("log.access_log",)),
    Rule("serviceAccountName", '"" (docs: modelmesh)', Outcome.DEPLOY, string,
         "runtime pods (deploy/base/runtime.yaml) never call the Kubernetes API and mount no token; "
         "set spec.template.spec.serviceAccountName there if your cluster needs one"),
    Rule("metrics.enabled", "true", Outcome.SETTING, boolean, _switch(
        _METRICS, "on, as ours by default (router.metrics_port, runtime.metrics_port)"),
         ("router.metrics_port", "runtime.metrics_port")),
    Rule("metrics.port", "2112", Outcome.SETTING, integer(1, 65535), _port(
        _METRICS, "metrics.enabled", 2112, "deploy/ (the metrics containerPorts of base/router.yaml and "
        "base/runtime.yaml, the mesh-router Service, base/network.yaml)"),
         ("router.metrics_port", "runtime.metrics_port")),
    Rule("metrics.scheme", "https", Outcome.UNSUPPORTED, string, _metrics_scheme),
    Rule("metrics.disablePrometheusOperatorSupport", "false", Outcome.DEPLOY, boolean, lambda value, ctx: ctx.note(
        Outcome.DEPLOY, "leave deploy/monitoring/ out: the base creates no ServiceMonitor" if value else
        "apply deploy/monitoring/ for the Prometheus Operator's ServiceMonitor (modelmesh-serving made one itself)")),
    Rule("scaleToZero.enabled", "true", Outcome.SETTING, boolean, _setting("controller.scale_to_zero", _MANAGED_ONLY),
         ("controller.scale_to_zero",)),
    Rule("scaleToZero.gracePeriodSeconds", "60", Outcome.SETTING, integer(0, 65535),
         lambda value, ctx: ctx.set("controller.scale_to_zero_grace_s", float(value)),
         ("controller.scale_to_zero_grace_s",)),
    Rule("restProxy.enabled", "true", Outcome.SETTING, boolean, _switch(
        ("router.rest_port",), "REST is on, served by the routers themselves (router.rest_port)"),
         ("router.rest_port",)),
    Rule("restProxy.port", "8008", Outcome.SETTING, integer(1, 65535), _port(
        ("router.rest_port",), "restProxy.enabled", 8008, "deploy/base/router.yaml (the containerPort rest, and the "
        "Services' port if clients should dial it), and set controller.rest_endpoint to the host:port clients use, "
        "for InferenceService statuses"), ("router.rest_port",)),
    Rule("restProxy.image", "kserve/rest-proxy:latest", Outcome.UNSUPPORTED, _IMAGE,
         f"{_NO_PROXY}, from the mesh image"),
    Rule("restProxy.resources", "req 50m/96Mi, lim 1/512Mi", Outcome.DEPLOY, _RESOURCES,
         f"{_NO_PROXY}: size the routers in deploy/base/router.yaml"),
    Rule("restProxy.skipVerify", "false", Outcome.UNSUPPORTED, boolean,
         f"{_NO_PROXY}: there is no TLS hop to skip verifying"),
    Rule("modelMeshImage", "kserve/modelmesh:latest", Outcome.DEPLOY, _IMAGE,
         "model-mesh's image has no role here: the mesh image is set under images: in "
         "deploy/kustomization.yaml, and for managed runtimes in controller.runtime_image"),
    Rule("modelMeshResources", "req 300m/448Mi, lim 3/448Mi", Outcome.DEPLOY, _RESOURCES,
         "size the runtime container in deploy/base/runtime.yaml: it holds the models, and its memory "
         "limit times runtime.capacity_fraction is their capacity"),
    Rule("storageHelperImage", "kserve/modelmesh-runtime-adapter:latest", Outcome.UNSUPPORTED, _IMAGE,
         f"{_NO_PULLER}, from the mesh image"),
    Rule("storageHelperResources", "req 50m/96Mi, lim 2/512Mi", Outcome.UNSUPPORTED, _RESOURCES,
         f"{_NO_PULLER}; storage.cache_bytes bounds their disk cache"),
    Rule("builtInServerTypes", "[triton, mlserver, ovms, torchserve]", Outcome.UNSUPPORTED, string_list,
         _server_types),
    Rule("runtimePodLabels", "app.kubernetes.io/* and modelmesh-service labels", Outcome.DEPLOY, string_map,
         "add them to spec.template.metadata.labels in deploy/base/runtime.yaml (runtime.labels is "
         "something else: placement labels)"),
    Rule("runtimePodAnnotations", "prometheus.io/* annotations", Outcome.DEPLOY, string_map,
         "add them to spec.template.metadata.annotations in deploy/base/runtime.yaml"),
    Rule("imagePullSecrets", "none", Outcome.DEPLOY, items(fields(name=string)),
         "add them to spec.template.spec.imagePullSecrets of the workloads in deploy/base"),
    Rule("allowAnyPVC", "false", Outcome.DEPLOY, boolean,
         "runtimes read the claims deploy/storage-pvc/ mounts at /pvc_mounts/<claim>; list each claim "
         "there (a model naming a claim not mounted fails its load)"),
    Rule("payloadProcessors", "[]", Outcome.SETTING, string_list, _payload_processors, ("router.payload_processors",)),
    Rule("etcdSecretName", "model-serving-etcd (deprecated)", Outcome.DEPLOY, string,
         "the mesh runs its own etcd (deploy/base/etcd.yaml); for yours, set registry.url and its TLS "
         "or user settings (registry.ca_file, cert_file, key_file, username, password_file) from that Secret"),
    Rule("modelMeshEndpoint", "(dev only)", Outcome.UNSUPPORTED, string,
         "a development switch of modelmesh-serving; the controller's router is "
         "controller.router_endpoint (deploy/base/controller.yaml sets it)"),
    Rule("internalModelMeshEnvVars", "(internal)", Outcome.UNSUPPORTED, items(fields(name=string, value=string)),
         "model-mesh's own environment has no meaning here; MESH_<GROUP>_<FIELD> variables set "
         "our settings (mesh settings)"),
)


def _schema() -> dict[str, Any]:
    """The rules as nested mappings (``{"restProxy": {"port": rule}}``), as the YAML nests them."""
    tree: dict[str, Any] = {}
    for rule in RULES:
        *groups, leaf = rule.key.split(".")
        node = tree
        for group in groups:
            node = node.setdefault(group, {})
        node[leaf] = rule
    return tree


def _collect(path: str, value: Any, schema: Mapping[str, Any], ctx: _Context) -> None:
    for name, spelled, sub in entries(path, value, schema, ctx):
        node = schema[name]
        if isinstance(node, Rule):
            ctx.key = spelled
            if sub is None:
                ctx.warnings.append((spelled, "no value, ignored (modelmesh-serving's default applies)"))
            else:
                ctx.given[node.key] = (spelled, node.check(spelled, sub, ctx))
        else:
            _collect(spelled, sub, node, ctx)


def _config_yaml(text: str) -> Any:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"not YAML: {' '.join(str(exc).split())[:200]}") from None
    except RecursionError:
        raise InvalidArgument("not YAML this program reads: nested too deeply") from None
    except ValueError as exc:  # an integer past Python's digit limit, and the like
        raise InvalidArgument(f"not YAML this program reads: {str(exc)[:120]}") from None
    if isinstance(document, dict) and document.get("kind") is not None:
        if document.get("kind") != "ConfigMap":
            raise InvalidArgument(f"expected a ConfigMap or the content of its config.yaml, got kind "
                                  f"{show(document.get('kind'))}")
        data = document.get("data")
        if not isinstance(data, dict) or "config.yaml" not in data:
            raise InvalidArgument("the ConfigMap has no data key config.yaml (modelmesh-serving requires it)")
        if not isinstance(data["config.yaml"], str):
            raise wrong("data.config.yaml", "a string (the YAML text)", data["config.yaml"])
        return _config_yaml(data["config.yaml"])
    return document


def convert(source: bytes | str) -> Conversion:
    """The ConfigMap (``kubectl get configmap model-serving-config -o yaml``) or the bare content of its
    ``config.yaml``, as settings and notes. Raises InvalidArgument on input that cannot be used."""
    if len(source) > MAX_BYTES:
        raise InvalidArgument(f"larger than {MAX_BYTES // 1024 // 1024} MiB: not a model-serving-config")
    if isinstance(source, bytes):
        try:
            source = source.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InvalidArgument("not UTF-8 text") from None
    ctx = _Context()
    _collect("", _config_yaml(source), _schema(), ctx)
    for rule in RULES:  # in table order, each seeing every value given (metrics.port asks metrics.enabled)
        if rule.key in ctx.given:
            ctx.key, ctx.rule = ctx.given[rule.key][0], rule.key
            if isinstance(rule.apply, str):
                ctx.note(rule.outcome, rule.apply)
            else:
                rule.apply(ctx.given[rule.key][1], ctx)
    ctx.out.notes[:0] = [Note(key, Outcome.WARNING, text) for key, text in ctx.warnings]
    return ctx.out


__all__ = ["MAX_BYTES", "RULES", "Conversion", "Note", "Outcome", "Rule", "convert"]
