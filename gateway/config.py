"""The federation configuration a gateway runs with (TOML), validated at start."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from federation import identity
from federation.config import ConfigError, Table, root
from federation.tls import TlsFiles


@dataclass(frozen=True)
class NodeEntry:
    """One member of the federation, reached at one or more addresses.

    Several addresses are replicas of the same member: nodes run with the same
    identity and the same data, for availability. A query goes to one of them
    and fails over (or hedges) to another; their answers count once.
    """

    node_id: str
    country: str
    # The first address listed (the only one for most members).
    address: str
    # Name the node's certificate must carry; pins which member we reached
    # (every replica carries the same name).
    tls_name: str
    # Further replicas' addresses, after ``address``.
    other_addresses: tuple[str, ...] = ()

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every replica's address, in the configured order."""
        return (self.address, *self.other_addresses)


@dataclass(frozen=True)
class Requester:
    """Who asks: carried in every token and so in every node's audit."""

    officer: str
    org: str
    country: str


class PrivateMode(Enum):
    """Whether exact digests go to a member by private matching (PROTOCOL.md "Private exact matching").

    ``auto``: with every member whose Describe offers ``private.exact.v2``, in
    clear with the others; ``always``: never in clear (a member without it is
    not asked, and says so); ``never``: in clear with every member.
    """

    AUTO = "auto"
    ALWAYS = "always"
    NEVER = "never"


@dataclass(frozen=True)
class GatewayConfig:
    gateway_id: str
    federation: str
    tls: TlsFiles
    signing_key: Path
    signing_kid: str
    requester: Requester
    node_timeout: float
    # Overall budget of one query, whatever the nodes do.
    deadline: float
    nodes: tuple[NodeEntry, ...]
    # Exact digests by private matching: per member when offered (``--private``/``--no-private`` override).
    private: PrivateMode = PrivateMode.AUTO


def load(path: Path) -> GatewayConfig:
    doc = root(path)
    doc.reject_unknown({"gateway", "tls", "signing", "requester", "nodes", "watch"})  # [watch]: gateway.watch_config
    gateway = doc.table("gateway")
    gateway.reject_unknown({"id", "federation", "node_timeout", "deadline", "private"})
    federation = gateway.get("federation", str)
    gateway_id = _member_id(gateway, "id")
    node_timeout = gateway.get("node_timeout", float, 5.0)
    if not 0 < node_timeout <= 120:
        raise ConfigError(f"{gateway.where('node_timeout')}: must be between 0 and 120 seconds")
    deadline = gateway.get("deadline", float, max(node_timeout, 10.0))
    if not node_timeout <= deadline <= 300:
        raise ConfigError(f"{gateway.where('deadline')}: must be at least node_timeout and at most 300 seconds")
    private = gateway.get("private", str, PrivateMode.AUTO.value)
    if private not in {m.value for m in PrivateMode}:
        raise ConfigError(f"{gateway.where('private')}: must be \"auto\", \"always\" or \"never\", got {private!r}")
    tls = doc.table("tls")
    tls.reject_unknown({"ca", "cert", "key"})
    signing = doc.table("signing")
    signing.reject_unknown({"key", "kid"})
    requester = doc.table("requester", required=False)
    requester.reject_unknown({"officer", "org", "country"})
    nodes = tuple(_node(t, federation) for t in doc.tables("nodes"))
    if not nodes:
        raise ConfigError(f"{path}: no [[nodes]] configured")
    seen: set[str] = set()
    for node in nodes:
        if node.node_id in seen:
            raise ConfigError(f"{path}: node id {node.node_id!r} listed twice "
                              "(replicas of one member go in one [[nodes]] table, as addresses = [...])")
        # The same address under two members is not refused here: the certificate's
        # name tells them apart, and the call to the wrong one fails saying so.
        seen.add(node.node_id)
    return GatewayConfig(
        gateway_id=gateway_id,
        federation=federation,
        tls=TlsFiles(tls.path_of("ca"), tls.path_of("cert"), tls.path_of("key")),
        signing_key=signing.path_of("key"),
        signing_kid=signing.get("kid", str),
        requester=Requester(
            officer=requester.get("officer", str, ""),
            org=requester.get("org", str, ""),
            country=requester.get("country", str, ""),
        ),
        node_timeout=node_timeout,
        deadline=deadline,
        nodes=nodes,
        private=PrivateMode(private),
    )


def _member_id(table: Table, key: str) -> str:
    try:
        return identity.check_member_id(table.get(key, str), key)
    except ValueError as exc:
        raise ConfigError(f"{table.where(key)}: {exc}") from None


def _node(table: Table, federation: str) -> NodeEntry:
    table.reject_unknown({"id", "country", "address", "addresses", "tls_name"})
    node_id = _member_id(table, "id")
    first, *others = _addresses(table)
    return NodeEntry(
        node_id=node_id,
        country=table.get("country", str, node_id),
        address=first,
        tls_name=table.get("tls_name", str, identity.node_tls_name(federation, node_id)),
        other_addresses=tuple(others),
    )


def _addresses(table: Table) -> tuple[str, ...]:
    """``address = "h:p"`` for one node, or ``addresses = ["h:p", ...]`` for replicas: exactly one of the two."""
    has_one, has_many = "address" in table.data, "addresses" in table.data
    if has_one and has_many:
        raise ConfigError(f"{table.where('addresses')}: give either address (one node) or addresses "
                          "(replicas of the member), not both")
    if not has_one and not has_many:
        raise ConfigError(f"{table.where('address')}: required (or addresses = [...] for replicas)")
    if has_one:
        return (_host_port(table, "address", table.get("address", str)),)
    values = table.get("addresses", list)
    if not values:
        raise ConfigError(f"{table.where('addresses')}: empty; list at least one HOST:PORT")
    addresses: list[str] = []
    for value in values:
        if not isinstance(value, str):
            raise ConfigError(f"{table.where('addresses')}: expected HOST:PORT strings, got {value!r}")
        address = _host_port(table, "addresses", value)
        if address in addresses:
            raise ConfigError(f"{table.where('addresses')}: {address!r} listed twice")
        addresses.append(address)
    return tuple(addresses)


def _host_port(table: Table, key: str, value: str) -> str:
    if ":" not in value:
        raise ConfigError(f"{table.where(key)}: expected HOST:PORT, got {value!r}")
    return value.strip()
