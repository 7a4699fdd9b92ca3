"""Evaluation on the deduplicated test sets: metrics with bootstrap CIs, calibration measures, plots."""
