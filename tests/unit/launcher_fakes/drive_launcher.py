"""Run the real launcher with other programs in place of the shard and/or router.

argv: the launcher's flags. FAKE_SERVER_CMD / FAKE_ROUTER_CMD: JSON lists replacing
the command prefix of `text-generation-server` / `text-generation-router`
(unset = the real program).
"""

from __future__ import annotations

import json
import os
import sys

from text_generation_launcher.cli import run
from text_generation_launcher.launch import Commands, default_commands

real = default_commands()
commands = Commands(
    server=tuple(json.loads(os.environ["FAKE_SERVER_CMD"])) if "FAKE_SERVER_CMD" in os.environ else real.server,
    router=tuple(json.loads(os.environ["FAKE_ROUTER_CMD"])) if "FAKE_ROUTER_CMD" in os.environ else real.router,
)
sys.exit(run(sys.argv[1:], commands))
