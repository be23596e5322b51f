"""The agent's only way to the broker (shared with the host side).

- ``transport``: the small interface the rest of the code uses (``Message``, ``Transport``);
- ``client``: the client on paho-mqtt (connect, subscribe with a sync barrier, publish, stop);
- ``inflight``: a publish in flight, as ``client.publish`` returns it;
- ``filters``: topic-filter matching for the client's handlers;
- ``network``: one network thread for many clients (the fleet simulator's).
"""
