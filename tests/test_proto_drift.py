"""The shipped stubs must be exactly what protoc makes of protos/ (run `make stubs` after an edit)."""

from pathlib import Path

from services.api import SERVICER_FUNCTIONS, codegen


def test_stubs_match_protos():
    generated = codegen.generate()
    stubs_dir = Path(codegen.__file__).parent
    assert set(generated) == {p.name for p in stubs_dir.glob("*_pb2*.py")}
    for name, content in generated.items():
        assert (stubs_dir / name).read_text() == content, f"services/api/{name} drifted from protos/: run make stubs"


def test_drift_is_detected(tmp_path):
    protos = tmp_path / "reinstruct" / "v1"
    protos.mkdir(parents=True)
    for source in (codegen.REPO_PROTOS_DIR / "reinstruct" / "v1").glob("*.proto"):
        (protos / source.name).write_text(source.read_text())
    (protos / "filter.proto").write_text(
        (protos / "filter.proto")
        .read_text()
        .replace("int64 kept_count = 7;", "int64 kept_count = 7;\n  int64 extra = 8;")
    )
    assert codegen.generate(tmp_path)["filter_pb2.py"] != codegen.generate()["filter_pb2.py"]


def test_servicer_functions_import_and_method_names_unique():
    import importlib

    from services.api import evaluator_pb2, filter_pb2, generator_pb2, trainer_pb2

    for path in SERVICER_FUNCTIONS:
        module, attr = path.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), attr))
    names = []
    for module in (generator_pb2, filter_pb2, trainer_pb2, evaluator_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            names.extend(m.name for m in service.methods)
    assert len(names) == len(set(names)), "Serve routes gRPC by method name: names must be unique"
