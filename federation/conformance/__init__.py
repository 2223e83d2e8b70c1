"""Conformance kit: the protocol's functional and hostile catalogue, as a tool.

``icse-conformance node`` plays a gateway against any node implementation;
``icse-conformance gateway`` plays a checking node for any gateway. Both speak
only the protocol (PROTOCOL.md) through ``federation``: the kit imports neither
``node`` nor ``gateway``, so it judges ours exactly as it judges a foreign one.
"""
