"""Which names go where: per-domain routes and the names answered on this machine.

This layer sits between the resolver and the upstreams. The resolver still asks
one thing, "answer this"; :class:`~doqproxy.routing.router.Router` picks the
route's upstream by the longest matching suffix, and
:class:`~doqproxy.routing.local_zones.LocalZones` answers the names that must
never leave the machine (RFC 6761, RFC 6303) before the cache is even asked.
"""
