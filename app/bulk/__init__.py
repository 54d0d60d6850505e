"""Bulk work handed to existing distributed engines (Ray Data), writing through the
catalogue's own code."""
