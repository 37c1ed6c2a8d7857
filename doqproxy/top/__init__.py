"""``doqproxy top``: a live view of a running forwarder, read from its metrics endpoint.

:mod:`.scrape` fetches and parses the Prometheus text, :mod:`.model` turns
successive scrapes into rates and a snapshot, :mod:`.text` prints one as plain
text, and :mod:`.view` draws it with ``rich`` (the ``doqproxy[top]`` extra).
Only the last needs ``rich``; nothing here is imported by the forwarder.
"""
