"""Seeded mutation fuzzing (tests/fuzz_inputs.py): PNG, JPEG, TIFF, GIF, BMP, WebP and zip inputs.

Only the documented outcomes may come out: an image, an ImageDecodeError with a reason, error rows, or a
BatchError. The CI slice is 2,100 cases (300 per kind); `python benchmarks/bench_fuzz.py` runs 100,000.
"""

from __future__ import annotations

import warnings

import fuzz_inputs
import numpy as np
import pytest

CI_CASES = 2_100


def test_seeds_are_valid_inputs_of_every_kind():
    pool = fuzz_inputs.seeds()
    assert sorted(pool) == ["bmp", "gif", "jpeg", "png", "tiff", "webp", "zip"]
    for kind, files in pool.items():
        check = fuzz_inputs.check_zip if kind == "zip" else fuzz_inputs.check_image
        outcomes = [check(data, max_pixels=1 << 20) for data in files]
        expected = ["ok"] * len(files)
        if kind == "tiff":
            expected[4] = "error"  # the two-page TIFF: refused ("has 2 frames")
        assert outcomes == expected, kind


def test_the_oracle_catches_an_escaping_exception(monkeypatch):
    # The harness must fail when something other than ImageDecodeError comes out (a test that can fail).
    monkeypatch.setattr(fuzz_inputs, "decode_image", lambda data, **kw: (_ for _ in ()).throw(KeyError(1)))
    with pytest.raises(AssertionError, match="KeyError"):
        fuzz_inputs.run(7, seed=0)


def test_mutations_are_seeded():
    data = fuzz_inputs.seeds()["png"][0]
    a = fuzz_inputs.mutate(data, np.random.default_rng([3, 4]))
    assert a == fuzz_inputs.mutate(data, np.random.default_rng([3, 4])) and a != data


def test_fuzzed_inputs_only_give_documented_outcomes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about odd EXIF/TIFF metadata; warnings are not failures
        counts = fuzz_inputs.run(CI_CASES, seed=0)
    assert sum(counts.values()) == CI_CASES
    for kind in ("bmp", "gif", "jpeg", "png", "tiff", "webp", "zip"):
        assert counts[(kind, "ok")] + counts[(kind, "error")] == CI_CASES // 7
        assert counts[(kind, "error")] > 0  # the mutations do break files (else the test proves nothing)
