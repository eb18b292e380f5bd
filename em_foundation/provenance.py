"""Code digests: which package sources a script runs, found from its imports, not from a list.

Each rule passes ``code_digest(<its script>)`` as a param. Snakemake reruns a job whose
params changed, so an edit to any module the script imports, directly or through other
package modules, reruns that rule and its dependants, and an edit elsewhere reruns nothing.

The imports are read with ``ast`` (nothing is imported, so this stays fast and torch-free
in the Snakefile), including imports inside functions. A module that loads modules by name
(``importlib.import_module``: the backbone builders named in the families table, the dataset
converters) depends on every module of its own package. Data files beside an imported
module (the config schema, the figure style) are part of its digest.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = "em_foundation"
PACKAGE_DIR = Path(__file__).resolve().parent
DATA_SUFFIXES = (".yaml", ".mplstyle")


def _module_file(name: str, root: Path) -> Path | None:
    """The source file of a dotted package module name (a package's __init__.py), if any."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts[1:])
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _with_parents(name: str, root: Path) -> set[Path]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    parts = name.split(".")
    files = {_module_file(".".join(parts[:k]), root) for k in range(1, len(parts) + 1)}
    return {file for file in files if file is not None}


def _absolute(node: ast.ImportFrom, path: Path, root: Path) -> str | None:
    """The absolute module name of ``from [..]module import ...`` (relative imports resolved)."""
    if node.level == 0:
        return node.module
    try:
        package = path.parent.relative_to(root).parts
    except ValueError:  # a relative import outside the package (a script): not ours
        return None
    base = (PACKAGE, *package[: len(package) - (node.level - 1)])
    return ".".join(base + ((node.module,) if node.module else ()))


def _direct_imports(path: Path, root: Path) -> frozenset[Path]:
    stat = path.stat()
    return _parsed_imports(path, root, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=None)
def _parsed_imports(path: Path, root: Path, mtime_ns: int, size: int) -> frozenset[Path]:
    """Cached per file version (the Snakefile asks once per rule for the same modules)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    named: set[str] = set()  # string constants that name a package module
    loads_by_name = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, path, root)
            if module:
                names.add(module)
                # ``from pkg import mod`` imports a submodule when ``mod`` is one.
                names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Attribute) and node.attr == "import_module":
            loads_by_name = True
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(f"{PACKAGE}."):
            named.add(node.value)
    files: set[Path] = set()
    if loads_by_name:
        # The modules it names, or, when the names are built at run time, its whole package.
        loaded = {file for name in named for file in _with_parents(name, root)}
        files |= loaded or {file for file in path.parent.glob("*.py") if file != path}
    for name in names:
        if name.split(".")[0] == PACKAGE:
            files |= _with_parents(name, root)
    return frozenset(files)


def imported_files(script: str | Path, root: Path = PACKAGE_DIR) -> list[Path]:
    """Every package source the script imports, transitively, plus data files beside them."""
    seen: set[Path] = set()
    todo = [Path(script).resolve()]
    while todo:
        for file in _direct_imports(todo.pop(), root):
            if file not in seen:
                seen.add(file)
                todo.append(file)
    # A data file counts when a module beside it names it or its kind (".mplstyle").
    data = {
        file
        for source in seen
        for file in source.parent.iterdir()
        if file.suffix in DATA_SUFFIXES and _names_file(source, file)
    }
    return sorted(seen | data)


def _names_file(source: Path, file: Path) -> bool:
    text = source.read_text()
    return file.name in text or f'{file.suffix}"' in text


def code_digest(script: str | Path, root: Path = PACKAGE_DIR) -> str:
    """Hash of the script and of every package file it runs (paths and contents)."""
    digest = hashlib.sha256()
    script = Path(script).resolve()
    for file in [script, *imported_files(script, root)]:
        name = file.name if file == script else file.relative_to(root).as_posix()
        digest.update(name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
