"""``python -m cmd_ipc``: the same as the ``cmd-ipc`` command."""

import sys

from cmd_ipc.cli import main

sys.exit(main())
