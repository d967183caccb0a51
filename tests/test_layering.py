"""Dependencies run one way: the API (razorpass/) -> passes (razorpass.passes) ->
kernels (razorpass.kernels); the benchmark uses the API only; no private name crosses
a package. Read from the source's import statements (ast), deferred imports included."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# repository folder -> the installed package it becomes
PACKAGES = {"razorpass": "razorpass", "passes": "razorpass.passes", "triton_kernels": "razorpass.kernels",
            "bench": "razorpass.bench"}
LAYER = {"razorpass": "api", "razorpass.passes": "passes", "razorpass.kernels": "kernels", "razorpass.bench": "bench"}
ALLOWED = {  # what each layer may import from razorpass
    "api": {"api", "passes", "kernels"},
    "passes": {"passes", "kernels"},
    "kernels": {"kernels"},
    "bench": {"bench", "api"},
}
# The kernel microbenchmarks time the kernels themselves (public names only).
EXCEPTIONS = {("bench/kernels.py", "razorpass.kernels.topk_compress"),
              ("bench/kernels.py", "razorpass.kernels.topk_compress_triton"),
              ("bench/kernels.py", "razorpass.kernels"),
              # the GPU proof's codecs section times them and their generated forms
              ("bench/gpu.py", "razorpass.kernels"), ("bench/gpu.py", "razorpass.kernels.fused_quantize")}


def _layer_of(module: str) -> str | None:
    best = None
    for pkg in LAYER:
        if module == pkg or module.startswith(pkg + "."):
            if best is None or len(pkg) > len(best):
                best = pkg
    return LAYER[best] if best else None


def _imports(path: pathlib.Path, package: str):
    """(imported module, imported names) for every import in ``path``, absolute."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod, [a.name for a in node.names]


def _sources(root: pathlib.Path = ROOT):
    """Every source file of each folder, sub-packages included, with its package."""
    for folder, package in PACKAGES.items():
        for f in sorted((root / folder).rglob("*.py")):
            yield f, ".".join([package, *f.relative_to(root / folder).parent.parts])


def _violations(path: pathlib.Path, package: str, rel: str):
    """What breaks the rule in ``path`` (``rel`` from the repository root), a line each."""
    mine = _layer_of(package)
    for module, names in _imports(path, package):
        theirs = _layer_of(module)
        if theirs is None:
            continue
        if (rel, module) not in EXCEPTIONS and theirs not in ALLOWED[mine]:
            yield f"{rel} ({mine}) imports {module} ({theirs})"
        if theirs != mine:
            private = [n for n in names if n.startswith("_")] + [p for p in module.split(".") if p.startswith("_")]
            if private:
                yield f"{rel} imports private {private} from {module}"


@pytest.mark.parametrize("path,package", list(_sources()), ids=lambda v: str(v).rpartition("/")[2])
def test_imports_point_one_way_and_no_private_name_crosses(path, package):
    assert list(_violations(path, package, str(path.relative_to(ROOT)))) == []


def test_the_rule_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from razorpass.backend import RazorBackend\nfrom ..report import _rows\n")
    found = list(_imports(bad, "razorpass.passes"))
    assert ("razorpass.backend", ["RazorBackend"]) in found and ("razorpass.report", ["_rows"]) in found
    assert _layer_of("razorpass.backend") == "api" not in ALLOWED["passes"]


def test_the_rule_walks_sub_packages(tmp_path):
    assert "razorpass.reference" in {package for _, package in _sources()}
    bad = tmp_path / "passes" / "sub" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from ...backend import RazorBackend\n")
    (found,) = _sources(tmp_path)
    assert found == (bad, "razorpass.passes.sub")
    assert list(_violations(*found, "passes/sub/bad.py")) == ["passes/sub/bad.py (passes) imports razorpass.backend (api)"]
