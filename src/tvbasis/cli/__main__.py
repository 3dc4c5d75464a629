"""``python -m tvbasis.cli``: the same as the ``tvbasis`` command."""

import sys

from tvbasis.cli import main

sys.exit(main())
