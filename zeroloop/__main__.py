"""``python -m zeroloop`` (and ``deepspeed --module zeroloop``) run the command line."""

import sys

from .cli import main

sys.exit(main())
