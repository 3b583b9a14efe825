"""MLServer and Triton behind the runtime, through the V2 model repository extension.

Both servers load models by name from a model repository directory they were started with, on
``RepositoryModelLoad`` (Triton: ``--model-control-mode=explicit``; MLServer with
``load_models_at_startup`` false); both serve the Triton-shaped repository RPCs on
``inference.GRPCInferenceService`` (``proto/inference/repository.proto``). The runtime owns that
directory (``runtime.server_repository``, shared with the server: the same host, or a volume both
containers mount): for each load it writes the entry the server expects, pointing at the model's
files where the runtime pulled them, asks the server to load it, and removes the entry after the
unload. Entries of an earlier run (marked with a ``.mesh-serving`` file) are removed at start;
nothing else in the directory is touched: a model whose entry name is taken by one the mesh did
not write (the operator's own model, say) fails to load rather than replace it. Every file of a
model folder handed to the server must lie inside the model roots on its real path
(``base.confine_tree``), and what a tenant's own settings file names is confined as well (below).

- **MLServer**: ``mm-<hash>/model-settings.json`` with the model ID as its name, the runtime class
  of the model's type (``IMPLEMENTATIONS``) and ``parameters.uri`` = the model's path. A model path
  that is a directory holding its own ``model-settings.json`` (a custom MLServer model) keeps that
  file's implementation and parameters; its name is replaced, and the paths among its parameters
  (``uri``, ``environment_tarball``: an environment MLServer unpacks, ``environment_path``: one
  whose Python it runs) are made absolute, inside the model roots.
- **Triton**: ``<name>/config.pbtxt`` and ``<name>/1/model.<ext>`` linked to the model file, the
  config naming the backend of the model's type (Triton completes the inputs and outputs of an
  ONNX model itself); a model path that is a directory in Triton's layout (``config.pbtxt`` and
  version folders) is linked entry by entry, its config copied with the name replaced. Such a
  config is the tenant's text: it is read within 64 KiB, and refused if one of its strings names a
  path out of the folder (absolute, ``~``, a ``..`` segment: ``default_model_filename``, label
  and warm-up files, a Python environment, written plainly, escaped or split across adjacent
  strings) or if it is an ensemble (its steps call other models of the server by name: another
  tenant's, or models the mesh evicts on its own terms). Triton names a model after its
  directory, so an ID that is not a plain name (or holds ``..``, which Triton refuses) is served
  as ``mm-<hash>``.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from mesh.errors import InvalidArgument, ModelLoadError
from mesh.gen.inference import repository_pb2 as rpb
from mesh.registry.records import ModelSpec
from mesh.runtime.loaders.base import resolve_path
from mesh.runtime.servers.base import ExternalServer

LOAD = "/inference.GRPCInferenceService/RepositoryModelLoad"
UNLOAD = "/inference.GRPCInferenceService/RepositoryModelUnload"
PREFIX = "mm-"
MARK = ".mesh-serving"  # in each entry the runtime writes: only those are removed at start
MAX_SETTINGS_BYTES = 64 * 1024
# MLServer's inference runtime for each model type (the mlserver-<name> packages).
IMPLEMENTATIONS = {
    "sklearn": "mlserver_sklearn.SKLearnModel",
    "xgboost": "mlserver_xgboost.XGBoostModel",
    "lightgbm": "mlserver_lightgbm.LightGBMModel",
    "mlflow": "mlserver_mlflow.MLflowRuntime",
    "huggingface": "mlserver_huggingface.HuggingFaceRuntime",
}
# Triton's backend and model file name for each model type.
BACKENDS = {
    "onnx": ("onnxruntime", "model.onnx"),
    "tensorflow": ("tensorflow", "model.savedmodel"),
    "tensorrt": ("tensorrt", "model.plan"),
    "openvino": ("openvino", "model.xml"),
}
_PLAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_NAME_LINE = re.compile(r'^\s*name\s*:\s*"[^"\n]*"\s*$', re.MULTILINE)
# config.pbtxt's lexemes: blanks, comments, quoted strings (with escapes), everything else.
_TEXT = re.compile(r"""\s+|\#[^\n]*|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|[^\s"'\#]+""")
PATH_KEYS = ("uri", "environment_tarball", "environment_path")  # MLServer parameters naming files


def hashed(model_id: str) -> str:
    return PREFIX + hashlib.sha256(model_id.encode()).hexdigest()[:32]


class RepositoryServer(ExternalServer):
    """What MLServer and Triton share: the repository directory and the load/unload RPCs."""

    def __init__(self, address: str, *, repository: str, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        if not repository:
            raise InvalidArgument(f"runtime.server_repository is required with runtime.server = {self.kind}: "
                                  "the model repository directory the server was started with")
        self.repository = Path(repository)

    def prepare(self) -> None:
        self.repository.mkdir(parents=True, exist_ok=True)
        for entry in self.repository.iterdir():  # an earlier run's entries: the server lost them too
            if self._ours(entry):
                shutil.rmtree(entry, ignore_errors=True)

    def _ours(self, entry: Path) -> bool:
        return entry.is_dir() and not entry.is_symlink() and (entry / MARK).exists()

    def entry(self, name: str) -> Path:
        return self.repository / name

    def _call(self, method: str, request: Any, response: Any, timeout: float) -> None:
        self.channel.call(method, request, response, timeout)

    def _load(self, spec: ModelSpec, path: Path, name: str, timeout: float) -> int:
        target = self.entry(name)
        if (target.exists() or target.is_symlink()) and not self._ours(target):
            raise ModelLoadError(f"the {self.kind} model server's repository holds an entry {target.name!r} that the "
                                 "mesh did not write; it is left alone (register the model under another ID)")
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        try:
            (target / MARK).write_text(spec.model_id[:1000])  # ours: removed at the next start
            self.write_entry(spec, path, name, target)
            self._call(LOAD, rpb.RepositoryModelLoadRequest(model_name=name), rpb.RepositoryModelLoadResponse,
                       timeout)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        return 0  # neither server reports a model's memory: measured by RSS or predicted

    def _unload(self, name: str, timeout: float) -> None:
        self._call(UNLOAD, rpb.RepositoryModelUnloadRequest(model_name=name), rpb.RepositoryModelUnloadResponse,
                   timeout)

    def forget(self, name: str) -> None:
        if self._ours(self.entry(name)):
            shutil.rmtree(self.entry(name), ignore_errors=True)

    def write_entry(self, spec: ModelSpec, path: Path, name: str, target: Path) -> None:
        raise NotImplementedError


class MLServer(RepositoryServer):
    kind = "mlserver"
    default_types = ("sklearn", "xgboost", "lightgbm")

    def server_name(self, model_id: str) -> str:
        return model_id

    def entry(self, name: str) -> Path:
        return self.repository / hashed(name)

    def write_entry(self, spec: ModelSpec, path: Path, name: str, target: Path) -> None:
        own = path / "model-settings.json" if path.is_dir() else None
        if own is not None and own.is_file():
            settings = self._custom(own, path)
        else:
            implementation = IMPLEMENTATIONS.get(spec.type.lower())
            if implementation is None:
                raise ModelLoadError(f"no MLServer runtime is known for type {spec.type!r}; give the model a "
                                     "directory with its own model-settings.json")
            settings = {"implementation": implementation, "parameters": {"uri": str(path)}}
        settings["name"] = name
        (target / "model-settings.json").write_text(json.dumps(settings))

    def _custom(self, own: Path, folder: Path) -> dict[str, Any]:
        """A custom model's own settings: kept, but named by us and with its files confined."""
        try:
            settings = json.loads(read_bounded(own))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{own.name} is not JSON: {str(exc)[:200]}") from None
        if not isinstance(settings, dict) or not isinstance(settings.get("implementation"), str):
            raise ModelLoadError(f"{own.name} must be an object naming an implementation")
        parameters = settings.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ModelLoadError(f"{own.name}: parameters must be an object")
        if not parameters.get("uri"):
            parameters["uri"] = str(folder)
        for key in PATH_KEYS:
            value = parameters.get(key)
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                raise ModelLoadError(f"{own.name}: parameters.{key} must be a path")
            # MLServer reads a relative path next to the settings file, which is ours now.
            try:
                parameters[key] = str(resolve_path(value if os.path.isabs(value) else str(folder / value),
                                                   self.policy.roots))
            except ModelLoadError as exc:
                raise ModelLoadError(f"{own.name}: parameters.{key}: {exc.message}") from None
        settings["parameters"] = parameters
        return settings


class Triton(RepositoryServer):
    kind = "triton"
    default_types = ("onnx",)

    def server_name(self, model_id: str) -> str:
        plain = _PLAIN.match(model_id) and ".." not in model_id and not model_id.startswith(PREFIX)
        return model_id if plain else hashed(model_id)

    def write_entry(self, spec: ModelSpec, path: Path, name: str, target: Path) -> None:
        config = path / "config.pbtxt" if path.is_dir() else None
        if config is not None and config.is_file():  # Triton's own layout
            try:
                text = read_bounded(config).decode("utf-8")
            except UnicodeDecodeError:
                raise ModelLoadError(f"{config.name} is not UTF-8 text") from None
            check_config(text, confine=bool(self.policy.roots))
            for child in path.iterdir():
                if child.name not in ("config.pbtxt", MARK):  # ours are written here; Triton reads neither
                    (target / child.name).symlink_to(child)
            line = f'name: "{name}"'
            text = _NAME_LINE.sub(line, text, count=1) if _NAME_LINE.search(text) else f"{line}\n{text}"
            (target / "config.pbtxt").write_text(text)
            return
        backend = BACKENDS.get(spec.type.lower())
        if backend is None:
            raise ModelLoadError(f"no Triton backend is known for type {spec.type!r}; give the model a directory "
                                 "in Triton's layout with its own config.pbtxt")
        if path.is_dir():  # the model's folder: its one file of the backend's kind
            suffix = Path(backend[1]).suffix
            files = sorted(p for p in path.iterdir() if p.suffix == suffix)
            if len(files) != 1:
                raise ModelLoadError(f"model folder {path.name!r} must hold exactly one {suffix} file "
                                     f"(found {len(files)})")
            path = files[0]
        (target / "1").mkdir()
        (target / "1" / backend[1]).symlink_to(path)
        (target / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "{backend[0]}"\nmax_batch_size: 0\n')


def read_bounded(file: Path) -> bytes:
    """A tenant's settings file, read only if within MAX_SETTINGS_BYTES; ModelLoadError past it."""
    with file.open("rb") as f:
        data = f.read(MAX_SETTINGS_BYTES + 1)
    if len(data) > MAX_SETTINGS_BYTES:
        raise ModelLoadError(f"{file.name} is larger than {MAX_SETTINGS_BYTES} bytes")
    return data


def check_config(text: str, *, confine: bool = True) -> None:
    """ModelLoadError if a tenant's config.pbtxt is an ensemble or (``confine``: model roots are
    set) names a path out of its folder (module docstring). Strings are read as Triton's text
    format reads them: escapes decoded, adjacent strings joined (comments and blanks between)."""
    strings: list[bytes] = []
    joined: bytes | None = None
    pos = 0
    while pos < len(text):
        match = _TEXT.match(text, pos)
        if match is None:
            raise ModelLoadError(f"config.pbtxt: a string opened at offset {pos} is not closed on its line")
        token, pos = match.group(), match.end()
        if token[0] in "\"'":
            try:
                value = codecs.escape_decode(token[1:-1].encode())[0]
            except ValueError as exc:
                raise ModelLoadError(f"config.pbtxt: a string with a bad escape: {str(exc)[:100]}") from None
            joined = value if joined is None else joined + value
        elif not token.isspace() and token[0] != "#":
            if joined is not None:
                strings.append(joined)
                joined = None
            if "ensemble_scheduling" in token:
                raise ModelLoadError("config.pbtxt describes an ensemble: it would call other models of the server "
                                     "by name, which a registration may not")
    if joined is not None:
        strings.append(joined)
    for value in strings if confine else ():
        parts = value.replace(b"\\", b"/").split(b"/")
        if value.startswith((b"/", b"~")) or b".." in parts or b"\0" in value or b"\\u" in value.lower():
            raise ModelLoadError(f"config.pbtxt: {value[:100].decode('utf-8', 'replace')!r} names a path outside "
                                 "the model's folder (or uses \\u escapes)")


__all__ = ["BACKENDS", "IMPLEMENTATIONS", "MLServer", "Triton"]
