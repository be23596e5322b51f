"""Brokers the host runs.

- ``mosquitto``: a private Mosquitto (config, start, stop);
- ``secure``: the secure broker's folder (CA, server and device identities, reloads);
- ``certs``/``acl``/``registry``: X.509, topic grants, the device registry as plain data.
"""
