"""Every default lives once, in services/common/config.py: a function parameter or a dataclass field
elsewhere that is named like a config setting and carries that setting's default as a literal is a
second copy, which silently stays behind when the config's changes. (A copy written as a reference,
`GenerationConfig().batch_size`, follows the config and is fine.) "Off" values (0, "", False) are
exempt: a function's own "nothing" is its behaviour, not a copy of a setting."""

import ast
from pathlib import Path

from pydantic import BaseModel

from services.common.config import ReinstructConfig

REPO = Path(__file__).resolve().parent.parent
NEUTRAL = (0, 0.0, "", False, None)
# parameters that carry a setting under a shorter name of their own
ALIASES = {
    "num_human": "num_human_in_context",
    "num_machine": "num_machine_in_context",
    "concurrency": "openai_concurrency",
    "examples_per_task": "bootstrap_examples_per_task",
    "poll_s": "poll_interval_s",
    "timeout_s": "request_timeout_s",
}


def _config_defaults(model: type[BaseModel], prefix: str = "") -> dict[str, list[tuple[str, object]]]:
    found: dict[str, list[tuple[str, object]]] = {}
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            for key, values in _config_defaults(field.annotation, f"{prefix}{name}.").items():
                found.setdefault(key, []).extend(values)
        elif isinstance(field.default, (int, float, str)) and not isinstance(field.default, bool):
            found.setdefault(name, []).append((prefix + name, field.default))
    return found


def _literal_defaults(tree: ast.AST):
    """(line, name, literal) for every parameter default and class-level annotated default."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            for arg, default in pairs:
                if isinstance(default, ast.Constant):
                    yield node.lineno, arg.arg, default.value
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    if isinstance(item.value, ast.Constant):
                        yield item.lineno, item.target.id, item.value.value


def test_no_default_is_written_twice():
    defaults = _config_defaults(ReinstructConfig)
    copies = []
    for path in sorted([*REPO.glob("services/**/*.py"), *REPO.glob("ray_jobs/**/*.py")]):
        if path.name == "config.py" or "api" in path.relative_to(REPO).parts:
            continue
        for line, name, value in _literal_defaults(ast.parse(path.read_text())):
            if isinstance(value, bool) or value in NEUTRAL:
                continue
            for setting, default in [*defaults.get(name, ()), *defaults.get(ALIASES.get(name, ""), ())]:
                if type(value) is type(default) and value == default:
                    copies.append(f"{path.relative_to(REPO)}:{line}: {name}={value!r} copies {setting}")
    assert not copies, "defaults written twice (refer to the config's instead):\n" + "\n".join(copies)


def test_the_check_sees_a_copy():
    tree = ast.parse("def f(batch_size: int = 16, top_p=0.5):\n    pass\nclass C:\n    max_new_tokens: int = 160\n")
    assert {(name, value) for _, name, value in _literal_defaults(tree)} == {
        ("batch_size", 16),
        ("top_p", 0.5),
        ("max_new_tokens", 160),
    }
    defaults = _config_defaults(ReinstructConfig)
    assert ("generation.batch_size", 16) in defaults["batch_size"] and ("generation.top_p", 0.5) in defaults["top_p"]
