"""What the agent reports.

- ``metrics``: what is measured and the JSON published on ``devices/<id>/metrics``;
- ``metrics_queue``: the bounded on-disk queue that carries metrics through outages.
"""
