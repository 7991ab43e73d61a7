"""Synchronous inventory helpers the API and the workflows share: IPAM, placement, VM reservation, config sync."""
