"""Addresses and sockets: parsing what the user typed, binding listeners."""
