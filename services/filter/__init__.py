"""Filter service: which generated tasks join the pool."""
