"""`python -m braintumor_flax.reports`: see `braintumor_flax.reports.readme`."""

from braintumor_flax.reports.readme import main

raise SystemExit(main())
