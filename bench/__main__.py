"""``python -m razorpass.bench``: the same as the ``razorpass-bench`` console script."""

import sys

from .harness import main

sys.exit(main())
