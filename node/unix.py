"""The command line as a Unix tool: output cut short by a closed pipe.

``icse-node audit export | head`` closes the pipe after a line; writing more
raises ``BrokenPipeError``. That is normal, not an error to report: the
command stops, closes its database properly, prints nothing more, and exits
with the status a shell shows for a tool ended by SIGPIPE.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # 141, as the shell reports for `seq 1 1000000 | head -n 1`


def stdout_closed() -> int:
    """Points standard output at /dev/null, so the interpreter's final flush
    does not fail again and print "Exception ignored ... BrokenPipeError";
    returns the exit status."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return EXIT_BROKEN_PIPE
