"""Two post-hoc rules against "no tumour" misses, judged on validation: should the served answer change?

Most of the served model's test errors are tumours called "no tumour" (meningiomas above all), and the
segmenter often outlines a region on exactly those slices (the README's disagreement table). Two rules could
turn such an answer into the most probable tumour class:

* **segmenter veto**: the classifier says "no tumour" but the segmenter outlines at least A model-grid pixels;
* **no-tumour threshold**: "no tumour" only when its calibrated probability reaches tau (else the next class).

The rule, fixed before any figure was read: adopt a rule only if its tumour-accuracy gain on **validation** has
a paired 95 % interval above zero (as `eval_tta.py`). Validation is reported whole and for its images unlike
any training image (cosine similarity of the trunk's pooled features to the nearest training image below 0.90,
as `eval_novelty.py`), the part closest to what the test sets hold. The test sets are reported beside it as a
diagnosis, never used to decide. Answers go through the one forward path (`Forward(..., segment=True)`).

    python benchmarks/eval_fusion.py [--model checkpoints-shared-trunk] [--out results/fusion.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from bench_common import cpu_ticks, machine, write_json  # noqa: E402
from eval_novelty import nearest, unit_rows  # noqa: E402

from braintumor_flax.calibration import softmax  # noqa: E402
from braintumor_flax.evaluation.evaluate import TEST_SETS, VAL_SPLIT  # noqa: E402
from braintumor_flax.evaluation.metrics import paired_accuracy_difference  # noqa: E402
from braintumor_flax.hub import BrainTumorPipeline  # noqa: E402
from braintumor_flax.labels import TUMOR_CLASSES  # noqa: E402
from braintumor_flax.models.forward import Forward  # noqa: E402
from braintumor_flax.paths import default_data_dir  # noqa: E402
from braintumor_flax.training.fit_statistics import prepare_training_data  # noqa: E402
from braintumor_flax.training.head_refit import trunk_outputs  # noqa: E402

NONE, MENINGIOMA = TUMOR_CLASSES.index("no_tumor"), TUMOR_CLASSES.index("meningioma")
VETO_AREAS = (1, 30, 100)  # model-grid pixels the segmenter must outline
THRESHOLDS = (0.8, 0.9, 0.95)  # calibrated p(no tumour) needed to answer "no tumour"
UNFAMILIAR = 0.90  # cosine similarity to the nearest training image (eval_novelty.py's lowest bin)


def rule_answers(probs: np.ndarray, area: np.ndarray) -> dict[str, np.ndarray]:
    """Each rule's answers: the served argmax, changed from "no tumour" to the likeliest tumour class."""
    served = probs.argmax(axis=1)
    tumour_only = np.where(np.arange(probs.shape[1]) == NONE, -np.inf, probs).argmax(axis=1)
    said_none = served == NONE
    rules = {f"segmenter_veto_{a}px": said_none & (area >= a) for a in VETO_AREAS}
    rules |= {f"no_tumour_threshold_{t}": said_none & (probs[:, NONE] < t) for t in THRESHOLDS}
    return {name: np.where(change, tumour_only, served) for name, change in rules.items()}


def judge(tumour: np.ndarray, served: np.ndarray, answers: dict[str, np.ndarray]) -> dict:
    meningioma = tumour == MENINGIOMA
    none = tumour == NONE
    out = {"served": {"accuracy": float((served == tumour).mean()),
                      "meningioma_recall": float((served[meningioma] == MENINGIOMA).mean()) if meningioma.any()
                      else None,
                      "no_tumour_recall": float((served[none] == NONE).mean()) if none.any() else None}}
    for name, pred in answers.items():
        changed = pred != served
        out[name] = {**paired_accuracy_difference(tumour, pred, served),
                     "changed": int(changed.sum()), "fixed": int((changed & (pred == tumour)).sum()),
                     "broken": int((changed & (served == tumour)).sum()),
                     "meningioma_recall": float((pred[meningioma] == MENINGIOMA).mean()) if meningioma.any()
                     else None,
                     "no_tumour_recall": float((pred[none] == NONE).mean()) if none.any() else None}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "checkpoints-shared-trunk"))
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "fusion.json")
    args = ap.parse_args(argv)
    ticks = cpu_ticks()
    pipeline = BrainTumorPipeline.from_pretrained(args.model)
    if pipeline.segmenter is None:
        raise SystemExit(f"{args.model} has no segmenter")
    data = prepare_training_data(pipeline, args.data_dir or default_data_dir())
    forward = Forward.from_pipeline(pipeline, batch_size=32)
    temperature = pipeline.info.calibration.tumor_temperature
    threshold = pipeline.segmenter.config.threshold
    train_features = unit_rows(trunk_outputs(pipeline, data.splits["train"])[0].tumor_pooled)
    result: dict = {"model": args.model, "mask_threshold": threshold, "tumour_temperature": temperature,
                    "rule": "adopt a rule only if its validation accuracy gain's paired 95 % CI is above 0",
                    "note": "difference = accuracy with the rule - served (paired bootstrap, exact McNemar)",
                    "splits": {}}
    for name in (VAL_SPLIT, *TEST_SETS.values()):
        split = data.splits[name]
        split = split.subset(split.tumor >= 0)
        out = forward(split.images, segment=True, head_inputs=True)
        probs = softmax(out.tumor_logits, temperature)
        area = (out.mask_prob >= threshold).sum(axis=(1, 2))
        similarity, _ = nearest(train_features, unit_rows(out.tumor_pooled))
        served = probs.argmax(axis=1)
        answers = rule_answers(probs, area)
        entry = {"n": len(split), "all": judge(split.tumor, served, answers)}
        unfamiliar = similarity < UNFAMILIAR
        entry[f"unlike_training_below_{UNFAMILIAR}"] = {
            "n": int(unfamiliar.sum()),
            **judge(split.tumor[unfamiliar], served[unfamiliar], {k: v[unfamiliar] for k, v in answers.items()})}
        result["splits"][name] = entry
        print(name, {k: (v.get("fixed"), v.get("broken")) for k, v in entry["all"].items() if k != "served"},
              flush=True)
    val = result["splits"][VAL_SPLIT]["all"]
    result["adopt"] = {name: bool(val[name].get("difference_ci95", [0])[0] > 0) for name in val if name != "served"}
    result["machine"] = machine(ticks_start=ticks)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
