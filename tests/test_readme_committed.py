"""The README's generated blocks follow from committed files alone.

`python -m braintumor_flax.reports` reads each evaluated checkpoint's config.json when that folder exists, and the
run's own record in its metrics.json otherwise. Runs under the ignored `runs/` exist only on the machine that
trained them, so on a clean clone (CI, a reader) the blocks must come out the same from `results/` and the
committed checkpoints' metadata: checked here in a copy without `runs/`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from braintumor_flax.reports import readme

ROOT = Path(__file__).resolve().parent.parent
METADATA = ("config.json", "metrics.json", "README.md")  # what the generator reads of a checkpoint (no weights)


def test_generated_readme_blocks_need_no_ignored_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "results", tmp_path / "results", ignore=shutil.ignore_patterns("*.png", "*.csv"))
    for folder in ROOT.glob("checkpoints*"):
        (tmp_path / folder.name).mkdir()
        for name in METADATA:
            if (folder / name).is_file():
                shutil.copy(folder / name, tmp_path / folder.name / name)
    monkeypatch.chdir(tmp_path)
    assert readme.main(["--check"]) == 0
    # ... and the check can fail: a hand edit inside a generated block is caught.
    text = (tmp_path / "README.md").read_text()
    start = text.index("<!-- recipes:start -->")
    edited = text[:start] + text[start:].replace("| 0.985 |", "| 0.999 |", 1)
    assert edited != text
    (tmp_path / "README.md").write_text(edited)
    assert readme.main(["--check"]) != 0
