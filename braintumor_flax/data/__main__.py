"""`python -m braintumor_flax.data`: see `braintumor_flax.data.datasets`."""

from braintumor_flax.data.datasets import main

raise SystemExit(main())
