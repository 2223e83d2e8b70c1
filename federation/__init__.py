"""What a gateway and a country node must agree on: the hash algorithms, the
wire contract (generated stubs), the signed query token, TLS identities and
configuration conventions. Neither side imports the other; both import this."""

__version__ = "0.1.0"
