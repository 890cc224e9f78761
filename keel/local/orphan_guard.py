"""Run a Python module as a helper server that exits when the process that started it is gone.

`python -m keelgraph.local.orphan_guard PARENT_PID MODULE [ARGS...]` runs `python -m MODULE ARGS...` in
this process, with a thread that ends it once PARENT_PID is no longer its parent. A parent that
exits normally stops its helpers itself (atexit); one killed by SIGKILL, an OOM kill or a lost
terminal runs no cleanup, and a 2-core machine then had an orphaned model server burning both cores
for 20 minutes (measured). Linux's PR_SET_DEATHSIG would fire when the starting *thread* ends, which
in a server's thread pool is not the process ending, so the helper watches instead.
"""

from __future__ import annotations

import os
import runpy
import sys
import threading
import time

POLL_S = 0.5


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    os._exit(0)  # the parent is gone: no one will ever ask this server anything


def main() -> None:
    parent, module, *args = sys.argv[1:]
    threading.Thread(target=_watch, args=(int(parent),), name="orphan-guard", daemon=True).start()
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
