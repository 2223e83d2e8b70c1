"""What a node's failed call is, said in words for the investigator.

gRPC reports a member that died mid-call, one that was never reachable, and a
certificate that does not verify with the same status and transport jargon
(``UNAVAILABLE``, ``Socket closed``, OpenSSL's text); an investigator must be
able to tell them apart from the status line alone. Pure: no I/O.
"""

from __future__ import annotations

import grpc

from gateway.config import NodeEntry
from gateway.results import NodeStatus

_REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}

def status_of(error: grpc.aio.AioRpcError) -> NodeStatus:
    code = error.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return NodeStatus.TIMED_OUT
    if code == grpc.StatusCode.UNAVAILABLE:
        return NodeStatus.UNAVAILABLE
    if code in _REFUSALS:
        return NodeStatus.REFUSED
    return NodeStatus.ERROR


_CONNECT_FAILED = "failed to connect to all addresses"
# How gRPC's transport words a connection that broke under a call already sent.
_LOST = ("socket closed", "connection reset", "broken pipe", "goaway", "stream removed", "end of tcp stream",
         "connection aborted")


def attempt_words(details: str) -> str:
    """One unavailable attempt, said as what happened to it (gRPC's text kept in brackets)."""
    text = details.strip() or "no detail"
    if _CONNECT_FAILED in text:
        rest = text.replace(_CONNECT_FAILED, "").lstrip("; ").removeprefix("last error: ")
        return f"failed to connect ({rest})" if rest else "failed to connect"
    if any(marker in text.lower() for marker in _LOST):
        return f"connection lost during the call ({text})"
    return text


def both_attempts(first: str, retry: str) -> str:
    said_first, said_retry = attempt_words(first), attempt_words(retry)
    if said_first == said_retry:
        return f"{said_first} (the retry met the same)"
    return f"{said_first}; retry: {said_retry}"


def tls_words(details: str, node: NodeEntry, address: str, ca: str) -> str:
    """A TLS failure said in words instead of OpenSSL's text (kept in the debug log)."""
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return (f"TLS: the certificate at {address} does not verify against the federation CA ({ca}): "
                "wrong CA file here, or what answers there is not the federation's node")
    if "Peer name" in details and "is not in peer certificate" in details:
        return (f"TLS: the certificate at {address} does not carry the name {node.tls_name}: "
                "another member, or a wrong tls_name or address in the configuration")
    return details
