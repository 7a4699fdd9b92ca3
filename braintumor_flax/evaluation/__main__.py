"""`python -m braintumor_flax.evaluation`: see `braintumor_flax.evaluation.evaluate`."""

from braintumor_flax.evaluation.evaluate import main

raise SystemExit(main())
