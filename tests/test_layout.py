"""The rooms say who runs them: `services/` is the ground floor (the four services and what they
share) and `ray_jobs/` the loop on top of it. A service that imported a loop module, even inside a
function, or started one by name (`-m ray_jobs.x`), would need the loop's package on every replica and
would tie a service's behaviour to the loop's internals."""

import ast
import re
from pathlib import Path

SERVICES = Path(__file__).resolve().parent.parent / "services"


def _loop_references(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [f"{path}:{node.lineno} import {a.name}" for a in node.names if a.name.split(".")[0] == "ray_jobs"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "ray_jobs":
            found.append(f"{path}:{node.lineno} from {node.module}")
        elif isinstance(node, ast.Constant) and re.search(r"-m\s+ray_jobs\b", str(node.value)):
            found.append(f"{path}:{node.lineno} starts {node.value!r}")
    return found


def test_no_service_module_imports_or_starts_a_loop_module():
    modules = [p for p in SERVICES.rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))]
    assert len(modules) > 40  # the walk found the package
    assert [ref for path in modules for ref in _loop_references(path)] == []
