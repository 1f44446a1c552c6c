"""Layers keep to their rooms: the library layer imports no framework, and no module borrows another's privates.

The library layer is `neft_lab.library`, `neft_lab.neurons` (with `neurons/scorers/`) and the foundation
modules below both it and the framework (`errors`, `integrity`, `io`, `losses`, `masters`, `seeded_random`), plus
the package root `neft_lab/__init__.py` (which every import of the layer runs). It may import the standard library,
torch, transformers, safetensors and numpy, and each other: no Hydra, omegaconf or Lightning, and no other
neft_lab module (training/, data/, models/, strategies/, analysis/, the pipeline...). Two more third-party
packages are tolerated: tqdm (a dependency of transformers: the scorers' progress bars) and peft (imported
inside `neurons/scorers/lora_reference.py`'s functions only, to read a PEFT model's adapters).

The scans read every import statement with `ast`, those inside functions included. Fast: nothing is loaded
but the subprocess test's imports.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import neft_lab

SRC = Path(neft_lab.__file__).resolve().parent.parent  # src/
PACKAGE = SRC / "neft_lab"

LAYER_PACKAGES = ("neft_lab.library", "neft_lab.neurons")
LAYER_MODULES = frozenset(
    {
        "neft_lab",
        "neft_lab.errors",
        "neft_lab.integrity",
        "neft_lab.io",
        "neft_lab.losses",
        "neft_lab.masters",
        "neft_lab.seeded_random",
    }
)
# tqdm: transformers' own dependency (progress bars); peft and bitsandbytes: imported inside functions only, by
# the LoRA-reference scorer and the 4-bit base (neurons/quantized.py), when a user asks for them
THIRD_PARTY = frozenset({"torch", "transformers", "safetensors", "numpy", "tqdm", "peft", "bitsandbytes"})
FORBIDDEN = frozenset({"hydra", "omegaconf", "lightning", "pytorch_lightning", "lightning_fabric"})


# ---- the scanner -------------------------------------------------------------------------------------------
def module_name(path: Path, root: Path = SRC) -> str:
    """`src/neft_lab/neurons/sliced.py` → `neft_lab.neurons.sliced` (a package's `__init__.py`: the package)."""
    parts = list(path.resolve().relative_to(root.resolve()).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _is_module(name: str) -> bool:
    """Whether `name` is a module or package of src/ (so `from neft_lab import training` imports one)."""
    base = SRC.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports(source: str, module: str, package: bool = False) -> list[tuple[int, str, str | None]]:
    """Every import in `source` (any depth, functions included) as (line, absolute module, name or None).

    `import a.b` gives ("a.b", None); `from a import b` gives ("a.b", None) when `a.b` is a module of src/,
    else ("a", "b"). Relative imports are resolved against `module` (a package's own name when `package`).
    """
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: len(module.split(".")) - node.level + (1 if package else 0)]
                base = ".".join([*parent, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append(
                    (node.lineno, full, None) if _is_module(full) else (node.lineno, base, alias.name)
                )
    return found


def in_layer(module: str) -> bool:
    return module in LAYER_MODULES or any(module == p or module.startswith(p + ".") for p in LAYER_PACKAGES)


def layer_violations(source: str, where: str, module: str, package: bool = False) -> list[str]:
    """What `source` imports that the library layer must not: one line each, naming file, line and module."""
    problems: dict[str, None] = {}  # in order, once each (`from m import a, b` is one import of m)
    for line, name, _ in imports(source, module, package):
        top = name.split(".")[0]
        if top in FORBIDDEN:
            problems[
                f"{where}:{line} imports {name} (no Hydra, omegaconf or Lightning in the library layer)"
            ] = None
        elif top == "neft_lab" and not in_layer(name):
            problems[f"{where}:{line} imports {name}, a framework module, not in the library layer"] = None
        elif top != "neft_lab" and top not in THIRD_PARTY and top not in sys.stdlib_module_names:
            problems[f"{where}:{line} imports {name}: not the stdlib nor one of {sorted(THIRD_PARTY)}"] = None
    return list(problems)


def private_imports(source: str, where: str, module: str, package: bool = False) -> list[str]:
    """`from neft_lab.X import _name` in another module than X: one line each (`import y as _y` is fine)."""
    return [
        f"{where}:{line} imports the private {name}.{imported}: make it public (with a docstring) in {name}"
        for line, name, imported in imports(source, module, package)
        if name.split(".")[0] == "neft_lab"
        and imported is not None
        and imported.startswith("_")
        and not imported.startswith("__")
        and name != module
    ]


def layer_files() -> list[Path]:
    files = [PACKAGE / "__init__.py"]
    files += [PACKAGE / f"{m.split('.')[-1]}.py" for m in sorted(LAYER_MODULES - {"neft_lab"})]
    for package in LAYER_PACKAGES:
        files += sorted(SRC.joinpath(*package.split(".")).rglob("*.py"))
    return files


def scan(files: list[Path], check, root: Path = SRC) -> list[str]:
    """`check` (`layer_violations` or `private_imports`) over `files`, modules named from `root` (src/)."""
    problems = []
    for path in files:
        where = str(path.resolve().relative_to(root.resolve().parent))
        problems += check(path.read_text(encoding="utf-8"), where, module_name(path, root), is_package(path))
    return problems


# ---- the tests ---------------------------------------------------------------------------------------------
def test_the_layer_files_exist():
    files = layer_files()
    assert all(path.is_file() for path in files), [str(p) for p in files if not p.is_file()]
    assert len(files) > 15  # library/, neurons/, neurons/scorers/ and the foundation modules


def test_the_library_layer_imports_no_framework():
    problems = scan(layer_files(), layer_violations)
    assert not problems, "the library layer imports outside itself:\n" + "\n".join(problems)


def test_no_module_imports_another_modules_private_names():
    problems = scan(sorted(PACKAGE.rglob("*.py")), private_imports)
    assert not problems, "private names imported across modules:\n" + "\n".join(problems)


def test_the_scanners_report_what_they_must():
    source = textwrap.dedent(
        """
        import json
        import torch
        from neft_lab.neurons import sliced
        from neft_lab.errors import ConfigError
        import hydra

        def late():
            from neft_lab.training.loss import per_example_loss
            from neft_lab import pipeline
            from omegaconf import OmegaConf
            import filelock
            from neft_lab.pipeline import _private, public as _alias
            from .neuron_set import _shape
        """
    )
    problems = layer_violations(source, "fake.py", "neft_lab.neurons.fake")
    assert problems == [
        "fake.py:6 imports hydra (no Hydra, omegaconf or Lightning in the library layer)",
        "fake.py:9 imports neft_lab.training.loss, a framework module, not in the library layer",
        "fake.py:10 imports neft_lab.pipeline, a framework module, not in the library layer",
        "fake.py:11 imports omegaconf (no Hydra, omegaconf or Lightning in the library layer)",
        f"fake.py:12 imports filelock: not the stdlib nor one of {sorted(THIRD_PARTY)}",
        "fake.py:13 imports neft_lab.pipeline, a framework module, not in the library layer",
    ]
    assert private_imports(source, "fake.py", "neft_lab.neurons.fake") == [
        "fake.py:13 imports the private neft_lab.pipeline._private: make it public (with a docstring) in "
        "neft_lab.pipeline",
        "fake.py:14 imports the private neft_lab.neurons.neuron_set._shape: make it public (with a docstring) "
        "in neft_lab.neurons.neuron_set",
    ]
    assert private_imports("from neft_lab.io import _umask\n", "io.py", "neft_lab.io") == []  # its own


def test_the_scan_reads_files(tmp_path):
    """The file path reports too: a layer module and a framework module written under a fake src/."""
    (tmp_path / "neft_lab" / "neurons").mkdir(parents=True)
    (tmp_path / "neft_lab" / "neurons" / "__init__.py").write_text("from . import fake\n")
    (tmp_path / "neft_lab" / "neurons" / "fake.py").write_text(
        "import torch\n\n\ndef late():\n    from neft_lab.cache import default_root\n"
    )
    (tmp_path / "neft_lab" / "stage.py").write_text("from neft_lab.neurons.fake import _helper\n")
    files = sorted((tmp_path / "neft_lab").rglob("*.py"))
    assert scan(files, layer_violations, tmp_path) == [
        f"{tmp_path.name}/neft_lab/neurons/fake.py:5 imports neft_lab.cache, a framework module, not in the "
        "library layer"
    ]  # stage.py is no library module, but what it imports (neft_lab.neurons.fake) is
    assert scan(files, private_imports, tmp_path) == [
        f"{tmp_path.name}/neft_lab/stage.py:1 imports the private neft_lab.neurons.fake._helper: make it public "
        "(with a docstring) in neft_lab.neurons.fake",
    ]


def test_importing_the_whole_layer_imports_no_framework():
    """Every library-layer module imported in a fresh process: no Hydra, omegaconf or Lightning, and no neft_lab
    module outside the layer, came in (dynamic imports included)."""
    modules = sorted({module_name(path) for path in layer_files()})
    code = textwrap.dedent(
        f"""
        import importlib, sys
        for name in {modules!r}:
            importlib.import_module(name)
        forbidden = sorted(m for m in sys.modules if m.split(".")[0] in {set(FORBIDDEN)!r})
        assert not forbidden, forbidden
        layer = {sorted(LAYER_MODULES)!r}
        outside = sorted(
            m for m in sys.modules
            if m.split(".")[0] == "neft_lab" and m not in layer
            and not any(m == p or m.startswith(p + ".") for p in {LAYER_PACKAGES!r})
        )
        assert not outside, outside
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_package_root_lists_the_library_api():
    """`neft_lab._LIBRARY` spells out `neft_lab.library.__all__` so that `import neft_lab` stays torch-free."""
    import neft_lab.library

    assert list(neft_lab._LIBRARY) == list(neft_lab.library.__all__)
    assert all(getattr(neft_lab, name) is getattr(neft_lab.library, name) for name in neft_lab._LIBRARY)
