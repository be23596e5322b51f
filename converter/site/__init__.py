"""A site broker bridged to the central one (docs/sites.md).

- ``bridge``: the Mosquitto bridge's configuration lines (pure);
- ``relay``: the bridge's TLS relay to central, counting bytes;
- ``prune``: clearing what central cleared while the site was cut off;
- ``watchdog``: probing the site's Mosquitto;
- ``supervisor``: all of it in one ``litefleet broker --upstream`` process.
"""
