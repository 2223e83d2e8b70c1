"""A country node: holds one member's hashes and answers signed hit/no-hit queries."""
