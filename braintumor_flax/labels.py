"""One set of class names for every dataset the project reads."""

from __future__ import annotations

TUMOR_CLASSES: tuple[str, ...] = ("glioma", "meningioma", "no_tumor", "pituitary")
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")

# Spellings used by the publishers (folder names, BRISC file-name codes) mapped to ours.
_TUMOR_ALIASES = {
    "glioma": "glioma", "gl": "glioma", "glioma_tumor": "glioma",
    "meningioma": "meningioma", "me": "meningioma", "meningioma_tumor": "meningioma",
    "no_tumor": "no_tumor", "notumor": "no_tumor", "no": "no_tumor", "no-tumor": "no_tumor",
    "pituitary": "pituitary", "pi": "pituitary", "pituitary_tumor": "pituitary",
}
_PLANE_ALIASES = {"ax": "axial", "axial": "axial", "co": "coronal", "coronal": "coronal",
                  "sa": "sagittal", "sagittal": "sagittal"}


def normalize_tumor(name: str) -> str:
    """Map any publisher spelling of a tumour class to its canonical name."""
    try:
        return _TUMOR_ALIASES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown tumour class {name!r}; expected one of {TUMOR_CLASSES}") from None


def normalize_plane(name: str) -> str:
    """Map a plane code (ax/co/sa) or name to its canonical name."""
    try:
        return _PLANE_ALIASES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown view plane {name!r}; expected one of {PLANES}") from None
