"""Silences gRPC's own C-core logging in the gateway's command line, unless asked for.

gRPC writes lines such as ``I1129 … ssl_transport_security.cc:1884] Handshake
failed …`` straight to stderr, between the tools' own messages and in a form
meant for gRPC's developers; what went wrong is already said by the tools in
words. gRPC reads ``GRPC_VERBOSITY`` once, when it is first imported, so this
module acts on import and must be imported before anything that imports grpc
(the first import of the gateway's CLI module). A serving node keeps those
lines: they are the only record of a refused TLS handshake, and
``node/stderr_relay.py`` turns them into the node's own log lines.

Asked for means: the user set ``GRPC_VERBOSITY`` or ``GRPC_TRACE`` themselves,
or runs the tool with ``--log-level DEBUG``. Once grpc is loaded (a program that
imports the CLI modules as a library, a test run) the setting could not take
effect and the host program's environment is left alone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping, Sequence


def wants_grpc_logs(argv: Sequence[str], environ: MutableMapping[str, str]) -> bool:
    if "GRPC_VERBOSITY" in environ or "GRPC_TRACE" in environ:
        return True
    for position, arg in enumerate(argv):
        if arg == "--log-level=DEBUG" or (arg == "--log-level" and argv[position + 1:position + 2] == ["DEBUG"]):
            return True
    return False


def quiet_grpc(argv: Sequence[str], environ: MutableMapping[str, str] = os.environ) -> None:
    """Sets ``GRPC_VERBOSITY=NONE`` unless gRPC's logs were asked for (see module doc)."""
    if "grpc" not in sys.modules and not wants_grpc_logs(argv, environ):
        environ["GRPC_VERBOSITY"] = "NONE"


quiet_grpc(sys.argv[1:])
