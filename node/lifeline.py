"""Ties a served node's life to its supervisor's, armed by the node itself.

A supervisor that starts nodes (the local federation of the demo, tests and
benchmarks) has live gRPC threads, so it must not run Python between fork and
exec (no pre-exec hook in ``subprocess``): a plain fork of a threaded process
that then runs the interpreter can deadlock or crash the child. So the
supervisor only passes flags, and the node arms the tie after exec:

* ``--parent-pid PID``: the kernel's parent-death signal (Linux
  ``PR_SET_PDEATHSIG``) sends the node SIGTERM when its parent dies, even by
  SIGKILL. It is armed after exec, so the parent may already be gone by then:
  if ``getppid()`` is no longer PID, the node stops at once.
* ``--stop-on-stdin-eof``: a thread reads standard input; end of file (the
  supervisor closed its end of the pipe, or the kernel did because the
  supervisor died) stops the node. This also works through wrappers such as
  ``ip netns exec`` or ``sudo``, where the node's parent is not the supervisor.

Either way the node stops by sending itself SIGTERM: the same graceful stop
(in-flight calls finished) as a supervisor's own stop.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class ParentGone(RuntimeError):
    """The supervisor died before the node could tie itself to it."""


def die_with_parent(parent_pid: int) -> None:
    """SIGTERM to this process when its parent dies; raises if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        raise ParentGone(f"parent process {parent_pid} is gone: not serving")


def stop_on_stdin_eof() -> threading.Thread:
    """SIGTERM to this process once standard input reaches end of file."""

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass  # whatever the supervisor writes is ignored; only EOF counts
        except OSError:
            pass  # stdin closed or unreadable: the supervisor is gone as well
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="stdin-lifeline", daemon=True)
    thread.start()
    return thread
