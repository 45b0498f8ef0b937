"""``python -m bagualu.cli ...`` behaves like the ``bagualu`` console script."""

import sys

from bagualu.cli.main import main

sys.exit(main())
