"""``python -m dpr_jax.cli``: the ``dpr-jax`` command."""

import sys

from dpr_jax.cli import main

sys.exit(main())
