"""modelmesh-serving's model-serving-config -> mesh settings (mesh.compat.modelmesh_config): every key of
the table, case-insensitive keys, the ConfigMap and bare forms, modelmesh-serving's defaults, bad input,
and the doc table kept equal to the module's."""

from __future__ import annotations

import re
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.compat.modelmesh_config import MAX_BYTES, RULES, Conversion, Outcome, convert
from mesh.errors import InvalidArgument
from mesh.settings import Settings, describe, load_settings

ROOT = Path(__file__).resolve().parents[2]
PKI = "/etc/mesh-pki"

# Each key of the table with a value that is not modelmesh-serving's default (where it has one to
# change), the settings it must give, and the outcome its note (if any) must have. tls.clientAuth is
# given with a tls.secretName, as it only means something with one.
CASES: dict[str, tuple[str, dict[str, Any], Outcome | None]] = {
    "inferenceServiceName": ("inferenceServiceName: my-mesh", {}, Outcome.DEPLOY),
    "inferenceServicePort": ("inferenceServicePort: 9033", {"router.port": 9033}, Outcome.DEPLOY),
    "storageSecretName": ("storageSecretName: my-storage", {}, Outcome.DEPLOY),
    "podsPerRuntime": ("podsPerRuntime: 3", {"controller.pods_per_runtime": 3}, Outcome.INFO),
    "tls.secretName": ("tls: {secretName: my-tls}",
                       {"tls.cert_file": f"{PKI}/tls.crt", "tls.key_file": f"{PKI}/tls.key",
                        "controller.router_ca_file": f"{PKI}/ca.crt"}, Outcome.DEPLOY),
    "tls.clientAuth": ("tls: {clientAuth: require}", {
        "tls.client_auth": "require", "tls.client_ca_file": f"{PKI}/ca.crt",
        "controller.router_cert_file": f"{PKI}/tls.crt", "controller.router_key_file": f"{PKI}/tls.key"},
        Outcome.DEPLOY),
    "headlessService": ("headlessService: false", {}, Outcome.DEPLOY),
    "grpcMaxMessageSizeBytes": ("grpcMaxMessageSizeBytes: 33554432", {"router.max_message_bytes": 33554432}, None),
    "enableAccessLogging": ("enableAccessLogging: true", {"log.access_log": True}, None),
    "serviceAccountName": ("serviceAccountName: modelmesh", {}, Outcome.DEPLOY),
    "metrics.enabled": ("metrics: {enabled: false}", {"router.metrics_port": -1, "runtime.metrics_port": -1}, None),
    "metrics.port": ("metrics: {port: 9090}", {"router.metrics_port": 9090, "runtime.metrics_port": 9090},
                     Outcome.DEPLOY),
    "metrics.scheme": ("metrics: {scheme: https}", {}, Outcome.UNSUPPORTED),
    "metrics.disablePrometheusOperatorSupport": ("metrics: {disablePrometheusOperatorSupport: true}", {},
                                                 Outcome.DEPLOY),
    "scaleToZero.enabled": ("scaleToZero: {enabled: false}", {"controller.scale_to_zero": False}, Outcome.INFO),
    "scaleToZero.gracePeriodSeconds": ("scaleToZero: {gracePeriodSeconds: 30}",
                                       {"controller.scale_to_zero_grace_s": 30.0}, None),
    "restProxy.enabled": ("restProxy: {enabled: false}", {"router.rest_port": -1}, None),
    "restProxy.port": ("restProxy: {port: 9008}", {"router.rest_port": 9008}, Outcome.DEPLOY),
    "restProxy.image": ("restProxy: {image: {name: kserve/rest-proxy, tag: v0.11.0}}", {}, Outcome.UNSUPPORTED),
    "restProxy.resources": ("restProxy: {resources: {requests: {cpu: 50m, memory: 96Mi}, limits: {cpu: 1}}}", {},
                            Outcome.DEPLOY),
    "restProxy.skipVerify": ("restProxy: {skipVerify: true}", {}, Outcome.UNSUPPORTED),
    "modelMeshImage": ("modelMeshImage: {name: kserve/modelmesh, tag: v0.11.0, digest: 'sha256:00'}", {},
                       Outcome.DEPLOY),
    "modelMeshResources": ("modelMeshResources: {requests: {cpu: 300m, memory: 448Mi}}", {}, Outcome.DEPLOY),
    "storageHelperImage": ("storageHelperImage: {name: x, tag: y, command: [/opt/app/puller]}", {},
                           Outcome.UNSUPPORTED),
    "storageHelperResources": ("storageHelperResources: {limits: {cpu: 2, memory: 512Mi}}", {}, Outcome.UNSUPPORTED),
    "builtInServerTypes": ("builtInServerTypes: [triton, mlserver, ovms]", {}, Outcome.UNSUPPORTED),
    "runtimePodLabels": ("runtimePodLabels: {app: my-app, tier: 1}", {}, Outcome.DEPLOY),
    "runtimePodAnnotations": ("runtimePodAnnotations: {prometheus.io/scrape: 'true'}", {}, Outcome.DEPLOY),
    "imagePullSecrets": ("imagePullSecrets: [{name: my-registry}]", {}, Outcome.DEPLOY),
    "allowAnyPVC": ("allowAnyPVC: true", {}, Outcome.DEPLOY),
    "payloadProcessors": ("payloadProcessors: ['http://logger:8080/consume']",
                          {"router.payload_processors": ("http://logger:8080/consume",)}, None),
    "etcdSecretName": ("etcdSecretName: my-etcd", {}, Outcome.DEPLOY),
    "modelMeshEndpoint": ("modelMeshEndpoint: 'kube:///modelmesh-serving:8033'", {}, Outcome.UNSUPPORTED),
    "internalModelMeshEnvVars": ("internalModelMeshEnvVars: [{name: MM_LOG_EACH_INVOKE, value: 'true'}]", {},
                                 Outcome.UNSUPPORTED),
}

# modelmesh-serving's defaults as its docs and sources give them (docs/kserve-notes.md section 6: its
# config-defaults.yaml and the code defaults of pkg/config/config.go), written out here.
UPSTREAM_DEFAULTS = """
inferenceServiceName: modelmesh-serving
inferenceServicePort: 8033
storageSecretName: storage-config
podsPerRuntime: 2
headlessService: true
grpcMaxMessageSizeBytes: 16777216
enableAccessLogging: false
serviceAccountName: ""
payloadProcessors: []
allowAnyPVC: false
tls: {secretName: "", clientAuth: ""}
metrics: {enabled: true, port: 2112, scheme: https, disablePrometheusOperatorSupport: false}
scaleToZero: {enabled: true, gracePeriodSeconds: 60}
restProxy:
  enabled: true
  port: 8008
  skipVerify: false
  image: {name: kserve/rest-proxy, tag: latest}
  resources: {requests: {cpu: 50m, memory: 96Mi}, limits: {cpu: "1", memory: 512Mi}}
modelMeshImage: {name: kserve/modelmesh, tag: latest}
modelMeshResources: {requests: {cpu: 300m, memory: 448Mi}, limits: {cpu: "3", memory: 448Mi}}
storageHelperImage: {name: kserve/modelmesh-runtime-adapter, tag: latest, command: [/opt/app/puller]}
storageHelperResources: {requests: {cpu: 50m, memory: 96Mi}, limits: {cpu: "2", memory: 512Mi}}
builtInServerTypes: [triton, mlserver, ovms, torchserve]
"""


def configmap(config_yaml: str) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "model-serving-config"},
                           "data": {"config.yaml": config_yaml}})


def loaded(conversion: Conversion, tmp_path: Path) -> Settings:
    """The settings our loader builds from the TOML the conversion writes (no environment)."""
    path = tmp_path / "mesh.toml"
    path.write_text(conversion.toml())
    return load_settings(path, env={})


def setting(settings: Settings, name: str) -> Any:
    group, _, field = name.partition(".")
    return getattr(getattr(settings, group), field)


def test_every_key_of_the_table_has_a_case() -> None:
    assert list(CASES) == [rule.key for rule in RULES]


def test_the_settings_a_rule_names_exist() -> None:
    known = {name for name, *_ in describe()}
    for rule in RULES:
        assert set(rule.settings) <= known, rule.key
        assert (rule.outcome is Outcome.SETTING) == bool(rule.settings), rule.key


@pytest.mark.parametrize("key", list(CASES))
def test_each_key(key: str, tmp_path: Path) -> None:
    text, expected, outcome = CASES[key]
    rule = next(r for r in RULES if r.key == key)
    assert set(expected) <= set(rule.settings)
    assert bool(expected) == (rule.outcome is Outcome.SETTING), "a key the table calls a setting writes one"
    if key == "tls.clientAuth":  # it means something only with a secret
        text = "tls: {secretName: my-tls, clientAuth: require}"
        expected = {**CASES["tls.secretName"][1], **expected}
    conversion = convert(text)
    assert conversion.values == expected
    notes = [n for n in conversion.notes if n.key == key]
    assert notes, "every key given is said something about"
    assert not [n for n in conversion.notes if n.outcome is Outcome.WARNING]
    if outcome is not None:
        assert outcome in {n.outcome for n in notes}, [str(n) for n in notes]
    settings = loaded(conversion, tmp_path)
    for name, value in conversion.values.items():
        assert setting(settings, name) == value
    toml = conversion.toml()
    for name in CASES[key][1]:  # each line under a comment naming its source key
        group, _, field = name.partition(".")
        block = toml.split(f"[{group}]\n", 1)[1]
        assert re.search(rf"^# from {re.escape(key)}: .*\n{field} = ", block, re.M), toml


def test_keys_are_case_insensitive() -> None:
    upper = convert("INFERENCESERVICEPORT: 9033\nRestProxy: {PORT: 9008}\n"
                    "TLS: {SecretName: t, clientauth: REQUIRE}\nmetrics: {Enabled: 'False'}\n")
    assert upper.values["router.port"] == 9033 and upper.values["router.rest_port"] == 9008
    assert upper.values["tls.client_auth"] == "require" and upper.values["router.metrics_port"] == -1
    assert not [n for n in upper.notes if n.outcome is Outcome.WARNING]
    assert any(n.key == "RestProxy.PORT" for n in upper.notes), "notes name the key as the input spells it"


def test_the_configmap_and_its_bare_config_yaml_give_the_same() -> None:
    bare = "podsPerRuntime: 4\nrestProxy:\n  port: 9008\nbogus: 1\n"
    assert convert(configmap(bare)) == convert(bare) == convert(bare.encode())
    assert convert(configmap(bare)).values == {"controller.pods_per_runtime": 4, "router.rest_port": 9008}
    # `kubectl get configmap -o yaml` adds fields of its own; other data keys are not read upstream either.
    full = yaml.safe_load(configmap(bare))
    full["metadata"].update(namespace="modelmesh-serving", resourceVersion="1", uid="x")
    full["data"]["other"] = "x"
    assert convert(yaml.safe_dump(full)) == convert(bare)


def test_modelmesh_serving_defaults_are_ours_or_notes(tmp_path: Path) -> None:
    conversion = convert(UPSTREAM_DEFAULTS)
    assert not [str(n) for n in conversion.notes if n.outcome is Outcome.WARNING]
    assert loaded(conversion, tmp_path) == Settings()
    said = {n.key for n in conversion.notes}
    assert said == {rule.key for rule in RULES} - {"etcdSecretName", "modelMeshEndpoint", "internalModelMeshEnvVars",
                                                    "runtimePodLabels", "runtimePodAnnotations", "imagePullSecrets"}
    # What differs is said: https metrics and the fixed server types are not supported.
    unsupported = {n.key for n in conversion.notes if n.outcome is Outcome.UNSUPPORTED}
    assert {"metrics.scheme", "builtInServerTypes"} <= unsupported


def test_an_empty_config_gives_nothing(tmp_path: Path) -> None:
    for text in ("", "# only a comment\n", configmap(""), "metrics:\n"):
        conversion = convert(text)
        assert conversion.values == {} and conversion.notes == []
        assert loaded(conversion, tmp_path) == Settings()


def test_unknown_keys_are_warned_about_with_a_suggestion() -> None:
    conversion = convert("podsPerRuntim: 3\nrestProxy: {prot: 9008, port: 9009}\nrestProxy.enabled: false\n"
                         "modelMeshImage: {nmae: x}\nimagePullSecrets: [{name: a, kind: b}]\n")
    warnings = {n.key: n.text for n in conversion.notes if n.outcome is Outcome.WARNING}
    assert warnings == {
        "podsPerRuntim": "unknown key, ignored (did you mean podsPerRuntime?)",
        "restProxy.prot": "unknown key, ignored (did you mean restProxy.port?)",
        # A dotted key is not a nested one, for viper either: restProxy.enabled stays true.
        "restProxy.enabled": "unknown key, ignored",
        "modelMeshImage.nmae": "unknown key, ignored (did you mean modelMeshImage.name?)",
        "imagePullSecrets[0].kind": "unknown key, ignored",
    }
    assert conversion.notes[:len(warnings)] == [n for n in conversion.notes if n.outcome is Outcome.WARNING]
    assert conversion.values == {"router.rest_port": 9009}


def test_a_key_with_no_value_is_warned_about() -> None:
    conversion = convert("podsPerRuntime:\n")
    assert [str(n) for n in conversion.notes] == [
        "warning: podsPerRuntime: no value, ignored (modelmesh-serving's default applies)"]


@pytest.mark.parametrize("first,second", [
    ("metrics: {enabled: false, port: 9090}", "metrics: {port: 9090, enabled: false}"),
    ("restProxy: {enabled: false, port: 9008}", "restProxy: {port: 9008, enabled: false}"),
])
def test_disabled_wins_over_a_port_in_any_order(first: str, second: str) -> None:
    a, b = convert(first), convert(second)
    assert a.values == b.values
    assert set(a.values.values()) == {-1}
    assert any(n.text.startswith("ignored: ") for n in a.notes)


def test_tls_client_auth() -> None:
    optional = convert("tls: {secretName: t, clientAuth: optional}")
    assert optional.values["tls.client_auth"] == "none"
    assert any(n.key == "tls.clientAuth" and n.outcome is Outcome.UNSUPPORTED for n in optional.notes)
    without_secret = convert("tls: {clientAuth: require}")
    assert without_secret.values == {}
    assert [n.text for n in without_secret.notes] == [
        "ignored: tls.secretName is empty, so there is no TLS (as in modelmesh-serving)"]
    assert convert("tls: {secretName: '', clientAuth: ''}").values == {}


def test_viper_reads_quoted_numbers_and_booleans() -> None:
    conversion = convert("inferenceServicePort: '9033'\nenableAccessLogging: 'TRUE'\n")
    assert conversion.values == {"router.port": 9033, "log.access_log": True}


@pytest.mark.parametrize("text,message", [
    ("inferenceServicePort: abc", "inferenceServicePort: expected an integer from 1 to 65535, got a string"),
    ("inferenceServicePort: 70000", "inferenceServicePort: expected an integer from 1 to 65535, got 70000"),
    ("podsPerRuntime: true", "podsPerRuntime: expected an integer from 1 to 65535, got a boolean"),
    ("grpcMaxMessageSizeBytes: 16.5",
     "grpcMaxMessageSizeBytes: expected an integer from 1 to 2147483647, got a number"),
    ("enableAccessLogging: yes please", "enableAccessLogging: expected true or false, got a string"),
    ("metrics: 5", "metrics: expected a mapping, got an integer"),
    ("restProxy: [port]", "restProxy: expected a mapping, got a list"),
    ("metrics: {scheme: ftp}", 'metrics.scheme: expected http or https, got "ftp"'),
    ("tls: {secretName: t, clientAuth: maybe}", 'tls.clientAuth: expected require, optional or empty, got "maybe"'),
    ("tls: {secretName: [a]}", "tls.secretName: expected a string, got a list"),
    ("runtimePodLabels: [a]", "runtimePodLabels: expected a mapping of strings, got a list"),
    ("runtimePodLabels: {app: {x: 1}}", "runtimePodLabels.app: expected a string, got a mapping"),
    ("builtInServerTypes: triton", "builtInServerTypes: expected a list of strings, got a string"),
    ("imagePullSecrets: [name]", "imagePullSecrets[0]: expected a mapping, got a string"),
    ("modelMeshResources: {requests: {cpu: [1]}}", "modelMeshResources.requests.cpu: expected a string, got a list"),
    ("podsPerRuntime: 2\nPODSPERRUNTIME: 3", "PODSPERRUNTIME: given twice (also as podsPerRuntime"),
    ("[1, 2]", "the configuration: expected a mapping, got a list"),
    ("just text", "the configuration: expected a mapping, got a string"),
    ("a: [", "not YAML: "),
    ("a: 1\n---\nb: 2\n", "not YAML: "),
    ("kind: Secret", 'expected a ConfigMap or the content of its config.yaml, got kind "Secret"'),
    ("kind: ConfigMap\ndata: {other: x}", "the ConfigMap has no data key config.yaml"),
    ("kind: ConfigMap\ndata: {config.yaml: 5}", "data.config.yaml: expected a string (the YAML text), got an integer"),
    pytest.param("[" * 50_000, "nested too deeply", id="deep-nesting"),
    pytest.param("podsPerRuntime: " + "9" * 5000, "not YAML this program reads", id="huge-integer"),
])
def test_bad_input_is_one_error_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        convert(text)
    assert message in info.value.message
    assert "\n" not in info.value.message


def test_input_is_bounded() -> None:
    with pytest.raises(InvalidArgument, match="larger than 1 MiB"):
        convert(b"#" * (MAX_BYTES + 1))
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        convert(b"podsPerRuntime: \xff")
    assert convert(b"#" * MAX_BYTES).values == {}


def test_an_alias_bomb_costs_what_its_text_costs() -> None:
    """Nine levels of nine aliases: 9**9 strings as a tree, a few hundred bytes as text. Under a key we
    know, the first item of the wrong shape stops the check; under one we do not, it is never walked."""
    levels = ["l0: &l0 [a, a, a, a, a, a, a, a, a]"]
    levels += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb = "\n".join(levels) + "\n"
    start = time.monotonic()
    with pytest.raises(InvalidArgument, match=r"builtInServerTypes\[0\]: expected a string, got a list"):
        convert(bomb + "builtInServerTypes: *l8\n")
    with pytest.raises(InvalidArgument, match="runtimePodLabels: expected a mapping of strings, got a list"):
        convert(bomb + "runtimePodLabels: *l8\n")
    warned = convert(bomb + "somethingElse: *l8\n")
    assert len(warned.notes) == 10 and all(n.outcome is Outcome.WARNING for n in warned.notes)
    assert time.monotonic() - start < 5


def test_toml_strings_are_escaped() -> None:
    odd = 'a"b\\c\nd\te\x7ff\u2028g\U0001f600'
    conversion = Conversion(values={"controller.namespace": odd}, sources={"controller.namespace": "from test"})
    assert tomllib.loads(conversion.toml()) == {"controller": {"namespace": odd}}


def test_tables_are_what_load_settings_takes() -> None:
    conversion = convert(UPSTREAM_DEFAULTS.replace("podsPerRuntime: 2", "podsPerRuntime: 5"))
    assert load_settings(env={}, overrides=conversion.tables()).controller.pods_per_runtime == 5
    assert tomllib.loads(conversion.toml()) == conversion.tables()


# -- the doc table (docs/migrating-from-modelmesh.md, "Your model-serving-config") ------------------


def doc_rows() -> dict[str, tuple[str, str]]:
    text = (ROOT / "docs" / "migrating-from-modelmesh.md").read_text()
    section = text.split("## Your model-serving-config", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0].endswith("`"):
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def test_the_doc_table_lists_the_keys_of_the_module() -> None:
    rows = doc_rows()
    assert list(rows) == [rule.key for rule in RULES]
    for rule in RULES:
        default, what = rows[rule.key]
        assert default.replace("`", "") == rule.default, rule.key
        for name in rule.settings:
            assert f"`{name}`" in what, (rule.key, name)
        if rule.outcome is not Outcome.SETTING:
            assert what.startswith(rule.outcome.value), (rule.key, what)
