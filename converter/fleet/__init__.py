"""The fleet as the broker's retained state shows it (``litefleet status``)."""
