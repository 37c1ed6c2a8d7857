"""Everything that answers the resolver's queries: DoQ pools, plain DNS, zones."""
