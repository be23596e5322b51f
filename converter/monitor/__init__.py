"""The fleet monitor.

- ``payloads``: device messages as validated frozen records; ``live``: the fleet now;
- ``collector``: broker to live view and SQLite; ``store``: the SQLite history;
- ``prometheus``/``page``/``http_server``: what it serves.
"""
