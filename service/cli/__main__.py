"""``python -m service.cli``: the ``hiedit`` command (tests and bench/common.py start servers this way)."""
import sys

from . import main

sys.exit(main())
