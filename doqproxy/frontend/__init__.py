"""The listeners: thin UDP, TCP and DoQ adapters that hand queries to the resolver."""
