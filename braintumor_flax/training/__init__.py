"""Training: recipes (`config`), the jitted steps and two-stage loop (`pipeline`), post-training statistics
(`fit_statistics`: calibration temperatures and OOD limits) and the `train.py` command line (`cli`)."""
