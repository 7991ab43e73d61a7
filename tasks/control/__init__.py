"""Workflows on the `control` queue: what happens, in which order, on which queue."""
