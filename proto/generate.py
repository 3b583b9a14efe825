"""Regenerate the Python stubs in mesh/gen/ from the .proto files beside this script.

    python proto/generate.py            # rewrite mesh/gen/
    python proto/generate.py --out DIR  # write elsewhere (the staleness test compares the two)

protoc writes imports as top-level packages (``from inference import ...``); the stubs live
inside ``mesh.gen``, so those imports are rewritten to ``from mesh.gen.inference import ...``.
The stubs pin the grpcio and protobuf runtimes they were made for (grpcio-tools 1.85.1 makes
stubs that refuse grpcio < 1.85.1 and protobuf < 7.35.1), so regenerate together with the pins.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "mesh" / "gen"
PACKAGES = ("inference", "mmesh")


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc  # only the generator needs grpcio-tools

    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}",
            f"--pyi_out={out}", f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written: list[Path] = []
    pattern = re.compile(rf"^from ({'|'.join(PACKAGES)}) import ", re.MULTILINE)
    for path in sorted(p for p in out.rglob("*.py*") if p.suffix in (".py", ".pyi")):  # not __pycache__
        text = pattern.sub(r"from mesh.gen.\1 import ", path.read_text())
        path.write_text(text)
        written.append(path)
    for package in PACKAGES:
        (out / package / "__init__.py").write_text("")
    (out / "__init__.py").write_text('"""Generated protobuf and gRPC stubs: run `python proto/generate.py`."""\n')
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    written = generate(args.out)
    print(f"wrote {len(written)} files under {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
