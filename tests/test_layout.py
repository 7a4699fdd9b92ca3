"""The package layout is a dependency direction, checked on every import statement (module level or not).

    models  <-  data / training / evaluation / serve          (and the shared core: labels, paths, xla, ...)
    serve never imports training or evaluation; reports never import evaluation, training or serve;
    the model card imports no other document (the README generator imports the model card, not the reverse).
"""

from __future__ import annotations

import ast
from pathlib import Path

import braintumor_flax

PACKAGE = Path(braintumor_flax.__file__).parent
CORE = {"labels", "paths", "xla", "calibration", "ood", "checkpoint_info"}  # numpy-level helpers every role may use
# role -> roles it may import (besides itself and the core)
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "models": set(),
    "hub": {"models", "reports"},
    "data": set(),
    "reports": set(),
    "training": {"models", "hub", "data"},
    "evaluation": {"models", "hub", "data", "reports", "training"},
    "serve": {"models", "hub", "data"},
}


def _role(module: str) -> str:
    """'braintumor_flax.serve.app_ui' -> 'serve'; core modules -> 'core'; the package root -> 'core'."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "braintumor_flax":
        raise ValueError(module)
    first = parts[1]
    return "core" if first in CORE or first == "__init__" else first


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("braintumor_flax.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("braintumor_flax"):
            if node.module == "braintumor_flax":  # `from braintumor_flax import x`
                found |= {f"braintumor_flax.{a.name}" for a in node.names if a.name != "__version__"}
            else:
                found.add(node.module)
    return found


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        out[".".join(rel.parts)] = path
    return out


def test_every_import_follows_the_dependency_direction():
    violations = []
    for module, path in sorted(_modules().items()):
        role = _role(module)
        for imported in _imports(path):
            target = _role(imported)
            if target not in {role, "core"} | ALLOWED[role]:
                violations.append(f"{module} ({role}) imports {imported} ({target})")
    assert not violations, "\n".join(violations)


def test_model_card_imports_no_other_document():
    card = PACKAGE / "reports" / "model_card.py"
    assert "braintumor_flax.reports.readme" not in _imports(card)


def test_the_checker_catches_a_violation(tmp_path):
    """The rule must be able to fail: a serve module importing training is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from braintumor_flax.training.pipeline import train_pipeline\n")
    imported = _imports(bad)
    assert imported == {"braintumor_flax.training.pipeline"}
    assert _role("braintumor_flax.training.pipeline") not in {"serve", "core"} | ALLOWED["serve"]


def test_core_modules_exist():
    names = {p.stem for p in PACKAGE.glob("*.py")}
    assert names >= CORE, CORE - names
