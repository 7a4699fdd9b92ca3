"""Publish the demo as a Hugging Face Space (Gradio SDK), with the model inside it or taken from the Hub.

    python -m braintumor_flax.serve.space OWNER/NAME                        # app + the served checkpoint in the Space
    python -m braintumor_flax.serve.space OWNER/NAME --model OWNER/MODEL    # app only; the Space loads the model repo

The Space runs `app.py` as the README's YAML header says (`sdk: gradio`, the pinned `sdk_version`). Files go
up through `HfApi.upload_folder`, which stores the safetensors weights with Git LFS as the Hub requires for
files over 10 MB. With `--model`, the Space variable BRAINTUMOR_FLAX_MODEL points the app at that model repo
(`BrainTumorPipeline.push_to_hub` or `train.py --push-to-hub` put it there).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from huggingface_hub import HfApi

from braintumor_flax.paths import PROJECT_ROOT, SERVED_CHECKPOINT_NAME
from braintumor_flax.serve.predictor import MODEL_ENV_VAR

# What the Space needs to run app.py; nothing else of the checkout (venvs, runs, results, tests, data) goes up.
APP_PATTERNS = ["app.py", "requirements.txt", "README.md", "pyproject.toml", "LICENSE", "braintumor_flax/**",
                "examples/**"]
CHECKPOINT_PATTERNS = [f"{SERVED_CHECKPOINT_NAME}/**"]
IGNORE_PATTERNS = ["**/__pycache__/**", "**/*.pyc", "**/.DS_Store"]


def space_patterns(*, with_checkpoint: bool) -> list[str]:
    return APP_PATTERNS + (CHECKPOINT_PATTERNS if with_checkpoint else [])


def push_space(repo_id: str, *, model: str | None = None, root: str | Path = PROJECT_ROOT, private: bool = False,
               token: str | None = None, commit_message: str = "Update the braintumor-flax demo") -> str:
    """Create (or update) the Space `repo_id` and upload the app; returns the commit URL."""
    root = Path(root)
    if not (root / "app.py").is_file():
        raise FileNotFoundError(f"{root} has no app.py: pass the project folder as root")
    if model is None and not (root / SERVED_CHECKPOINT_NAME / "config.json").is_file():
        raise FileNotFoundError(f"{root / SERVED_CHECKPOINT_NAME} has no checkpoint: train one, or pass "
                                "model=<Hub repo id>")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    if model is not None:
        api.add_space_variable(repo_id, MODEL_ENV_VAR, model, description="model repo the app loads")
    return api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=root, commit_message=commit_message,
                             allow_patterns=space_patterns(with_checkpoint=model is None),
                             ignore_patterns=IGNORE_PATTERNS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m braintumor_flax.serve.space", description=__doc__.split("\n")[0])
    ap.add_argument("repo_id", help="the Space, OWNER/NAME")
    ap.add_argument("--model", default=None, help="Hub model repo for the app to load instead of the served checkpoint")
    ap.add_argument("--private", action="store_true")
    args = ap.parse_args(argv)
    print(push_space(args.repo_id, model=args.model, private=args.private))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
