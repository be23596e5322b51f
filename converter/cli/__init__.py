"""``litefleet``: the host command line, one module per command (only this package writes to the console)."""
