"""``python -m twisted_mta.cli``: the ``twisted-mta`` command."""

import sys

from twisted_mta.cli import main

sys.exit(main())
