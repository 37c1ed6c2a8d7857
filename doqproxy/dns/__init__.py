"""DNS wire format, the bad-input table, and messages on their way up and back (pure)."""
