"""What every built-in loader shares: model paths, the Loader / LoadedModel contracts, helpers.

A **Loader** turns a model path into a **LoadedModel**. The runtime calls ``Loader.load`` in a
loader thread and ``LoadedModel.predict`` in inference threads, several at once for one model, so
each LoadedModel is either safe to call concurrently or holds its own lock (of the built-ins, only
lightgbm needs one; each module says why).

``Loader.load`` is a template method: it checks the device, finds the model file, and turns any
exception of the library into a :class:`~mesh.errors.ModelLoadError` carrying the loader's reason
("sklearn: cannot load /p/model.joblib: <exception text>"), which lands in the model's status. The
subclasses only write ``_load``.

``LoadedModel.predict`` is also a template method: it resolves the requested outputs (unknown name
-> InvalidArgument; none requested -> the model's ``default_outputs``) before calling ``_predict``,
so that a model computes only what was asked for (scikit-learn's ``predict_proba`` costs as much as
``predict``) and every format answers an unknown output name the same way.

Model paths are local: a path or a ``file://`` URI. Models in object storage reach a loader as
the local path the runtime pulled them to (``mesh.storage.puller``, before the load), as
ModelMesh's puller does for its model servers. A path may name the model file itself, or a
directory holding exactly one file with the loader's extensions (searched recursively, so Triton's
``<model>/1/model.onnx`` layout works, within ``MAX_WALK_ENTRIES`` entries); hidden files are
ignored. The file must be a regular file with one of the loader's extensions.

Confinement (:class:`LoadPolicy`, from the runtime's settings; ``mesh.paths`` has the rule): with
model roots, a path is read only if its real path (symbolic links resolved) lies under a root's
real path, and so is every file a directory's walk would load.

Code on load: a pickle (sklearn's ``.joblib``/``.pkl``) runs code when it is loaded, and a
TorchScript archive runs its own graph, which can read files. A runtime with
``runtime.allow_code_formats = false`` refuses both, and serves scikit-learn models saved with
skops (``.skops``), which loads only types it trusts (``runtime.skops_trusted_types`` adds more).
Loading these formats from storage you do not trust is safe only in a process that holds nothing
worth stealing (docs/security.md).
"""

from __future__ import annotations

import abc
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mesh.errors import InvalidArgument, MeshError, ModelLoadError, NotHere
from mesh.paths import as_directory, confine, shown, under_prefix
from mesh.tensors import TensorSpec

_DEVICE = re.compile(r"^(ram|gpu(\d+))$")
# Library exceptions can be long (xgboost appends a C++ stack trace); a status line stays readable.
_MAX_REASON = 1000


# A directory is walked for its model file (or its size) up to this many entries: a registration
# naming /usr must cost a bounded walk, not seconds of the load's time.
MAX_WALK_ENTRIES = 10_000


@dataclass(frozen=True)
class LoadPolicy:
    """What a runtime lets a load read and run (settings ``runtime.model_roots``,
    ``allow_code_formats``, ``skops_trusted_types``); the default confines nothing."""

    roots: tuple[str, ...] = ()
    allow_code_formats: bool = True
    trusted_types: tuple[str, ...] = ()


def resolve_path(path_or_uri: str, roots: Sequence[str] = ()) -> Path:
    """The local path to read for a registration's path or ``file://`` URI, confined to ``roots``
    on its real path (module docstring); ModelLoadError with the reason otherwise."""
    try:
        confined = confine(path_or_uri, roots)
    except InvalidArgument as exc:
        raise ModelLoadError(exc.message) from None
    path = Path(confined).expanduser() if not roots else Path(confined)
    if roots:
        real = Path(os.path.realpath(path))
        if not _inside(real, roots):
            raise ModelLoadError(f"model path {shown(confined)} leads outside the model roots "
                                 f"({', '.join(roots)}) through a symbolic link")
        path = real
    if not path.exists():
        where = "" if path.is_absolute() else \
            f" (a relative path: resolved against this runtime's working directory, {shown(os.getcwd())})"
        raise ModelLoadError(f"model path {shown(str(path))} does not exist{where}")
    return path


def _mode(path: Path) -> int:
    try:
        return path.stat().st_mode
    except OSError:
        return 0


def _inside(real: Path, roots: Sequence[str]) -> bool:
    text = str(real)
    return any(under_prefix(text, as_directory(os.path.realpath(root))) for root in roots)


def _walk(path: Path) -> list[Path]:
    """The regular files under ``path`` (no hidden parts, symbolic links not followed into
    directories), at most ``MAX_WALK_ENTRIES`` entries visited; ModelLoadError past that."""
    found: list[Path] = []
    visited = 0
    stack = [path]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            visited += 1
            if visited > MAX_WALK_ENTRIES:
                raise ModelLoadError(f"model directory {shown(str(path))} holds more than {MAX_WALK_ENTRIES} "
                                     "entries; point the model path at the model's own directory or file")
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.is_file():
                found.append(Path(entry.path))
    return found


def file_size(path: Path) -> int:
    """Bytes on disk: the file's size, or the sum over a directory's files (0 if unreadable or too
    many to walk)."""
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in _walk(path))
        return path.stat().st_size
    except (OSError, ModelLoadError):
        return 0


def find_model_file(path: Path, extensions: Sequence[str], type_name: str, roots: Sequence[str] = ()) -> Path:
    """``path`` itself if it is a file, else the single file under it with one of ``extensions``;
    a regular file (under ``roots`` by its real path, when there are roots) with such an
    extension, else ModelLoadError."""
    wanted = "/".join(extensions)
    if path.is_dir():
        found = sorted(p for p in _walk(path) if p.suffix.lower() in extensions)
    elif stat.S_ISREG(_mode(path)):
        if path.suffix.lower() not in extensions:
            raise ModelLoadError(f"{type_name}: {shown(path.name)} is not a {wanted} file (its extension decides "
                                 "how it is read)")
        found = [path]
    else:
        raise ModelLoadError(f"{type_name}: model path {shown(str(path))} is neither a regular file nor a "
                             "directory")
    if roots:
        outside = [p for p in found if not _inside(Path(os.path.realpath(p)), roots)]
        if outside:
            raise ModelLoadError(f"{type_name}: {shown(str(outside[0]))} leads outside the model roots "
                                 f"({', '.join(roots)}) through a symbolic link")
    if not found:
        raise ModelLoadError(f"{type_name}: no {wanted} file in {shown(str(path))}")
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(path)) for p in found[:10])
        raise ModelLoadError(
            f"{type_name}: {str(path)!r} holds several {wanted} files ({names}); "
            f"point the model path at one of them"
        )
    return found[0]


def gpu_index(device: str) -> int | None:
    """The N of ``gpu<N>``, None for ``ram``; ModelLoadError for anything else."""
    m = _DEVICE.match(device)
    if m is None:
        raise ModelLoadError(f"unknown device {device!r}; expected 'ram' or 'gpu<N>'")
    return int(m.group(2)) if m.group(2) is not None else None


def reason(exc: BaseException) -> str:
    """An exception as one readable status line: its text, or its type when it has none.

    A text of several lines is a traceback of the model's own code (TorchScript's interpreter puts
    its whole stack in the message, the error last): the line kept is the last one that is not a
    frame or a source line, which is what went wrong; the whole text is left to the runtime's log
    (the exception stays chained to the error the caller raises)."""
    text = str(exc).strip() or type(exc).__name__
    if not any(c.isalpha() for c in text):  # KeyError(0) from a garbage pickle reads "0"
        text = f"{type(exc).__name__}: {text}"
    text = text.split("\nStack trace:", 1)[0].strip()  # xgboost's C++ trace helps no operator
    if "\n" in text:
        text = last_meaningful_line(text)
    if len(text) > _MAX_REASON:
        text = text[:_MAX_REASON] + "..."
    return text


def last_meaningful_line(text: str) -> str:
    """The line of a multi-line error that says what went wrong: the last one that is neither blank,
    nor indented (a traceback's frames and source lines), nor a traceback header."""
    for line in reversed(text.splitlines()):
        if line.strip() and not line[0].isspace() and not line.startswith("Traceback ") \
                and not line.rstrip().endswith(":") and line.strip() not in ("~~~~", "^"):
            return line.strip()
    return text.strip().splitlines()[-1].strip()


class LoadedModel(abc.ABC):
    """A model in memory, ready to predict.

    ``inputs`` / ``outputs`` describe it for ModelMetadata; ``outputs`` lists every output the
    model can produce and ``default_outputs`` those returned when a request names none.
    """

    platform: ClassVar[str] = ""

    def __init__(
        self,
        *,
        model_id: str,
        type: str,
        device: str,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        default_outputs: list[str] | None = None,
    ) -> None:
        self.model_id = model_id
        self.type = type
        self.device = device
        self.inputs = inputs
        self.outputs = outputs
        self.default_outputs = default_outputs if default_outputs is not None else [o.name for o in outputs]
        self._closed = False

    def predict(
        self, inputs: Mapping[str, np.ndarray], requested: Sequence[str] = ()
    ) -> dict[str, np.ndarray]:
        """The requested outputs (``default_outputs`` when none), in requested order.

        Synchronous and safe to call from several threads at once. Raises InvalidArgument for
        inputs the model cannot take or an unknown output name, and NotHere after ``close()``
        (the copy was unloaded under the request: the router retries elsewhere).
        """
        if self._closed:
            raise NotHere(f"model {self.model_id!r} was unloaded from this instance")
        names = list(dict.fromkeys(requested)) if requested else self.default_outputs
        known = {o.name for o in self.outputs}
        for name in names:
            if name not in known:
                raise InvalidArgument(
                    f"unknown output {name!r}; model {self.model_id!r} has outputs {sorted(known)}"
                )
        result = self._predict(inputs, names)
        return {name: result[name] for name in names}

    @abc.abstractmethod
    def _predict(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """Compute at least the outputs in ``names`` (all known to the model)."""

    @abc.abstractmethod
    def footprint_bytes(self) -> int:
        """The memory the model's own objects hold, measured after the load (see each loader)."""

    def warm_up(self) -> None:  # noqa: B027 (a hook: most formats have nothing to warm)
        """Make the library create, now, what it creates lazily at a first prediction (on a GPU: a
        session's per-thread cuBLAS/cuDNN handles and workspaces), so that it belongs to the load's
        measured size. Runs on the thread that will run the copy's predictions. Default: nothing."""

    def close(self) -> None:
        """Release the model's memory; idempotent. In-flight predictions finish normally."""
        self._closed = True
        self._release()

    @abc.abstractmethod
    def _release(self) -> None:
        """Drop the references to the library's model objects."""


class Loader(abc.ABC):
    """Loads one model format. Instances are stateless and shared by all loads."""

    type: ClassVar[str]
    extensions: ClassVar[tuple[str, ...]]
    # Whether ``load`` accepts ``gpu<N>``; the runtime should place other types in RAM.
    supports_gpu: ClassVar[bool] = False
    # Extensions whose files run code when loaded (refused by LoadPolicy.allow_code_formats=False).
    code_extensions: ClassVar[tuple[str, ...]] = ()

    def load(self, model_id: str, path: Path, key: Mapping[str, Any], device: str,
             policy: LoadPolicy | None = None) -> LoadedModel:
        """Load the model at ``path`` (a file, or a directory holding one model file) onto ``device``.

        ``key`` is the registration's parsed model key; the built-in loaders need nothing from it
        and accept any. Raises ModelLoadError with the reason.
        """
        policy = policy or LoadPolicy()
        index = gpu_index(device)
        if index is not None and not self.supports_gpu:
            raise ModelLoadError(f"{self.type}: this loader runs models in RAM only, not on {device}")
        file = find_model_file(path, self.extensions, self.type, policy.roots)
        if not policy.allow_code_formats and file.suffix.lower() in self.code_extensions:
            raise ModelLoadError(
                f"{self.type}: {file.suffix} files run code when they are loaded, and this runtime refuses "
                f"them (runtime.allow_code_formats = false){self.safe_format_hint}")
        try:
            return self._load(model_id, file, key, device, policy)
        except MeshError:
            raise
        except ImportError as exc:
            raise ModelLoadError(
                f"{self.type}: the library for this model type is not installed ({reason(exc)}); "
                f"install mesh-serving[runtimes]"
            ) from exc
        except Exception as exc:
            raise ModelLoadError(f"{self.type}: cannot load {file}: {reason(exc)}") from exc

    safe_format_hint: ClassVar[str] = ""  # what to use instead of a code format, for the error

    @abc.abstractmethod
    def _load(self, model_id: str, file: Path, key: Mapping[str, Any], device: str,
              policy: LoadPolicy) -> LoadedModel:
        """Build the LoadedModel from ``file``; any exception becomes a ModelLoadError."""


def tabular_input(inputs: Mapping[str, np.ndarray], n_features: int | None, type_name: str) -> np.ndarray:
    """The one 2-D numeric input of a tabular model (sklearn, xgboost, lightgbm), checked.

    The name is free (clients name it "input", "X", "predict", ...): tabular models have one.
    """
    if len(inputs) != 1:
        raise InvalidArgument(
            f"{type_name} models take exactly one input, the request has {len(inputs)}: {list(inputs)}"
        )
    name, arr = next(iter(inputs.items()))
    if arr.dtype.kind not in "biuf":
        raise InvalidArgument(f"input {name!r}: {type_name} models take numbers, not {arr.dtype}")
    if arr.ndim != 2:
        raise InvalidArgument(
            f"input {name!r}: {type_name} models take a 2-D input [rows, features], "
            f"got shape {list(arr.shape)}"
        )
    if n_features is not None and arr.shape[1] != n_features:
        raise InvalidArgument(
            f"input {name!r}: model expects {n_features} features, input has {arr.shape[1]}"
        )
    return arr


def held(obj: Any, model_id: str) -> Any:
    """``obj`` if the model still holds it, else NotHere (it was closed while the request ran)."""
    if obj is None:
        raise NotHere(f"model {model_id!r} was unloaded from this instance")
    return obj
