"""Code digests follow what a script really imports, transitively within the package."""

from __future__ import annotations

from pathlib import Path

from em_foundation.provenance import code_digest, imported_files

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "em_foundation"


def _names(script: str) -> set[str]:
    return {path.relative_to(PACKAGE).as_posix() for path in imported_files(REPO / "scripts" / script)}


def test_rules_depend_on_what_their_scripts_import() -> None:
    train = _names("train.py")
    # Lazy imports inside functions, the head's alignment helpers, builders named in the families table.
    assert {
        "training/forest.py",
        "alignment/features.py",
        "feature_cache.py",
        "backbones/timm_vit.py",
        "backbones/openclip.py",
    } <= train
    assert not {name for name in train if name.startswith(("figures/", "analysis/"))}
    # training ends by choosing each run's decision rules on its validation slices, as evaluation scores
    assert {"evaluation/decision.py", "evaluation/evaluate.py"} <= train
    assert {"alignment/adabn.py", "grid.py", "evaluation/metrics.py"} <= _names("evaluate.py")
    assert "evaluation/metrics.py" in _names("aggregate.py")
    # Relative imports inside a package; data files a module names (schema, figure style).
    assert "analysis/probe.py" in _names("domain_analysis.py")
    assert "figures/paper.mplstyle" in _names("figure.py")
    assert "config.schema.yaml" in _names("prepare_dataset.py")
    # Reading a prepared file does not load every converter.
    assert "data/synthetic.py" not in _names("aggregate.py")


def _package(root: Path) -> Path:
    files = {
        "em_foundation/__init__.py": "",
        "em_foundation/a.py": "from em_foundation.sub import b\n",
        "em_foundation/sub/__init__.py": "",
        "em_foundation/sub/b.py": "def f():\n    from .c import g\n",
        "em_foundation/sub/c.py": "g = 1\n",
        "em_foundation/unrelated.py": "x = 1\n",
        "scripts/run.py": "from em_foundation.a import b\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "em_foundation"


def test_digest_changes_with_a_transitive_module_and_only_then(tmp_path: Path) -> None:
    package = _package(tmp_path)
    script = tmp_path / "scripts" / "run.py"
    before = code_digest(script, package)
    (package / "unrelated.py").write_text("x = 2\n")
    assert code_digest(script, package) == before, "a module the script never imports changed its digest"
    (package / "sub" / "c.py").write_text("g = 2\n")  # reached only through a lazy relative import
    assert code_digest(script, package) != before
