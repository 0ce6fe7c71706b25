"""``python -m evafusion_jax.demo``."""

import sys

from evafusion_jax.demo.driver import main

sys.exit(main())
