"""The README is the contract: CI runs its test command, and the Space header matches the pins."""

import re

from braintumor_flax.paths import PROJECT_ROOT


def _readme() -> str:
    return (PROJECT_ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", _readme(), re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    assert test_command.strip() in (PROJECT_ROOT / ".ci" / "run").read_text()


def test_space_header_matches_pinned_gradio():
    header = _readme().split("---")[1]
    pinned = re.search(r"^gradio==(\S+)$", (PROJECT_ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert re.search(r"^sdk: gradio$", header, re.M)
    assert re.search(rf"^sdk_version: {re.escape(pinned)}$", header, re.M)
    assert re.search(r"^app_file: app.py$", header, re.M)
