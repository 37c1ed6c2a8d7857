"""The answer cache: policy, entries kept as wire bytes, and the bounded store."""
