"""The agent's only way to the broker (shared with the host side).

- ``transport``: the small interface the rest of the code uses (``Message``, ``Transport``);
- ``client``: the one module that talks to paho-mqtt.
"""
