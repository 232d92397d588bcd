"""PyTriton binding (see its issue)."""
