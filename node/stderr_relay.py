"""gRPC's own log lines, re-emitted as the node's structured log lines.

gRPC's C core writes plain text straight to file descriptor 2 (``I1129 ...
ssl_transport_security.cc:2563] Handshake failed with error ...``), in the
middle of the node's JSON lines, and the Python server never learns of a
refused TLS handshake: that line is the only place a certificate problem of a
gateway (expired, wrong CA, no client-auth usage, none at all) shows up.

So ``icse-node serve`` points descriptor 2 at a pipe read by a small relay
*process* (``start``): it parses each line and logs it in the node's format, a
refused handshake as ``TLS handshake refused`` with its reason. A process,
not a thread, because the lines that matter most are written just before the
node dies (an abort in the C core): the relay reads them to the end after the
node is gone. The node's own logging, and Python's ``sys.stderr``, keep the
original standard error. The relay ignores SIGINT/SIGTERM (sent to the whole
process group by Ctrl-C or systemd) and ends when the pipe closes, that is
when the node has exited; if it ever failed, the C core's writes would fail
silently and the node would go on serving.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence

from federation import logs

_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
# absl's prefix: level letter, MMDD hh:mm:ss.micros, thread id, file:line]
_ABSL = re.compile(r"([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ ([\w.+-]+:\d+)\] ?(.*)")
# "Handshake failed with error SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CODE: text"
_HANDSHAKE = re.compile(r"Handshake failed with error (\w+)(?:: error:[0-9a-fA-F]+:[^:]*:[^:]*:(\w+)(?:: (.*))?)?")
_NO_CERTIFICATE = "PEER_DID_NOT_RETURN_A_CERTIFICATE"
# OpenSSL's words for what an operator most often meets, with what it means here.
_HINTS = {
    "unable to get local issuer certificate": "not issued by the federation's CA",
    "unsupported certificate purpose": "no TLS client-auth usage: not a gateway certificate",
}

grpc_log = logging.getLogger("icse.node.grpc")
tls_log = logging.getLogger("icse.node.tls")


def start(level: str, fmt: str) -> None:
    """Routes descriptor 2 (the C core's log) through a relay process; Python's
    ``sys.stderr`` stays on the original standard error. Call before logging
    is configured. If the relay cannot be started, says so and leaves things as they are."""
    original = os.dup(2)
    try:
        relay = subprocess.Popen(
            [sys.executable, "-m", "node.stderr_relay", "--log-level", level, "--log-format", fmt],
            stdin=subprocess.PIPE, stdout=original, stderr=original, close_fds=True,
        )
    except OSError as exc:
        os.close(original)
        print(f"icse-node: gRPC's log lines stay plain text: cannot start the log relay ({exc})", file=sys.stderr)
        return
    assert relay.stdin is not None
    sys.stderr.flush()
    os.dup2(relay.stdin.fileno(), 2)
    relay.stdin.close()  # descriptor 2 is now the pipe's only writer: the relay ends when the node does
    sys.stderr = open(original, "w", buffering=1, encoding="utf-8", errors="backslashreplace",  # noqa: SIM115
                      closefd=True)


def relay_line(line: str) -> None:
    """Logs one line the C core wrote; anything else (a fatal error's report) as it is, at ERROR."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return
    parsed = _ABSL.fullmatch(line)
    if parsed is None:
        grpc_log.error(line, extra={"source": "stderr"})
        return
    letter, source, text = parsed.groups()
    handshake = _HANDSHAKE.match(text)
    if handshake is not None:
        tls_log.warning("TLS handshake refused", extra={"reason": handshake_reason(text), "source": source})
        return
    grpc_log.log(_LEVELS[letter], text, extra={"source": source})


def handshake_reason(text: str) -> str:
    """The reason of a refused handshake in words, from the C core's line."""
    parsed = _HANDSHAKE.match(text)
    if parsed is None:
        return text
    ssl_error, code, detail = parsed.groups()
    if code == _NO_CERTIFICATE:
        return "the client presented no certificate"
    if code == "CERTIFICATE_VERIFY_FAILED":
        hint = f" ({_HINTS[detail]})" if detail in _HINTS else ""
        return "the client's certificate does not verify" + (f": {detail}{hint}" if detail else "")
    if code:
        return code.lower().replace("_", " ") + (f": {detail}" if detail else "")
    return ssl_error


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.stderr_relay", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="json")
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logs.configure(args.log_level, args.log_format)
    for raw in sys.stdin.buffer:
        relay_line(raw.decode("utf-8", "replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
