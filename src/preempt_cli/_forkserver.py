"""Imported only by the forkserver that starts the I/O worker processes (``set_forkserver_preload``).

It moves the forkserver, and with it the workers it forks, out of the run's process group. A SIGTERM sent
to the whole group (``timeout``, ``scancel``, a scheduler) then reaches the main process alone, which
finishes the files being written and lists them. Sent to the forkserver too, it ended the forkserver, and
the pool, which learns of each worker's end through the forkserver, took every worker for dead: the files
being written failed ("worker process failed"), half-written. Both still end with the main process: the
forkserver when its pipe from the main process closes, each worker by its watch
(:func:`preempt_cli.imageio.start_io_worker`).

A worker that starts for a pool the main process has already closed (Ctrl-C in a run's first second)
fails quietly (:func:`preempt_cli.imageio.quiet_for_a_closed_pool`).
"""

import os
import sys

from preempt_cli.imageio import quiet_for_a_closed_pool

sys.excepthook = quiet_for_a_closed_pool
if hasattr(os, "setpgid"):
    os.setpgid(0, 0)
