"""Generates the Python gRPC stubs in services/api from protos/.

Run `python -m services.api.codegen` after editing a .proto; tests/test_proto_drift.py fails when the
shipped stubs differ from what this produces. protoc writes absolute imports (`from reinstruct.v1
import common_pb2`); we rewrite them to relative ones so the stubs live inside our package and Serve's
gRPC proxy can import them from the installed distribution.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_PACKAGE_DIR = Path("reinstruct") / "v1"
STUBS_DIR = Path(__file__).resolve().parent
REPO_PROTOS_DIR = STUBS_DIR.parent.parent / "protos"
_ABSOLUTE_IMPORT = re.compile(r"^from reinstruct\.v1 import (\w+_pb2)", re.MULTILINE)
# The module name protoc bakes into message classes; it must be importable so pickling (Ray) works.
_MODULE_NAME = re.compile(r"'reinstruct\.v1\.(\w+_pb2)'")


def generate(protos_dir: Path = REPO_PROTOS_DIR) -> dict[str, str]:
    """Returns {stub file name: content} for every .proto under protos_dir/reinstruct/v1."""
    from grpc_tools import protoc

    proto_files = sorted(str(p.relative_to(protos_dir)) for p in (protos_dir / PROTO_PACKAGE_DIR).glob("*.proto"))
    if not proto_files:
        raise FileNotFoundError(f"no .proto files under {protos_dir / PROTO_PACKAGE_DIR}")
    with tempfile.TemporaryDirectory() as out:
        include = str(Path(protoc.__file__).parent / "_proto")
        code = protoc.main(
            ["protoc", f"-I{protos_dir}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}"]
            + proto_files
        )
        if code != 0:
            raise RuntimeError(f"protoc failed with exit code {code}")
        generated = {}
        for path in sorted((Path(out) / PROTO_PACKAGE_DIR).glob("*.py")):
            content = _ABSOLUTE_IMPORT.sub(r"from . import \1", path.read_text())
            generated[path.name] = _MODULE_NAME.sub(r"'services.api.\1'", content)
        return generated


def main() -> None:
    for name, content in generate().items():
        (STUBS_DIR / name).write_text(content)
        print(f"wrote services/api/{name}", file=sys.stderr)


if __name__ == "__main__":
    main()
