"""The federation gateway: signs a query per node, fans it out, merges the answers."""
