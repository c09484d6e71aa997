"""``python -m lorafleet.worker.cli``: the ``lorafleet`` command."""

import sys

from lorafleet.worker.cli import main

sys.exit(main())
