"""The model file the hints of ``mesh up`` register, so that they work as printed.

A hint naming ``/path/to/model.joblib`` fails when pasted; one naming a real file answers. The
file is a logistic regression trained on the iris data bundled with scikit-learn (no download),
written once to ``$XDG_CACHE_HOME/mesh-serving/example/iris.joblib`` and reused. ``mesh up`` runs
this module in a child process (``python -m mesh.embedded.example``) while its components start,
so that the supervisor, which lives as long as the mesh, never imports scikit-learn.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# A row of iris' first class: what the printed `mesh infer` and curl lines send.
EXAMPLE_ROW = [5.1, 3.5, 1.4, 0.2]


def example_model_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mesh-serving" / "example" / "iris.joblib"


def write_example_model(path: Path) -> Path:
    if path.exists():
        return path
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    joblib.dump(LogisticRegression(max_iter=500).fit(x, y), tmp)
    tmp.replace(path)  # atomic: two `mesh up`s starting at once never read half a file
    return path


def main() -> int:
    try:
        print(write_example_model(example_model_path()))
    except Exception as exc:  # the hints then say to use one's own model; the mesh runs anyway
        print(f"cannot write the example model: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
