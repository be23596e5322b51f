"""Brokers the host runs.

- ``mosquitto``: a private Mosquitto (config, start, stop);
- ``secure``: the secure broker's folder (CA, server and device identities);
- ``reload``: the running secure broker (find it, make it reread its files);
- ``sites``/``uplink``: central's site identities, which devices each site owns, and the
  uplink bundle a site broker reads (the site broker itself: :mod:`converter.site`);
- ``certs``/``acl``/``registry``/``layout``: X.509, topic grants, the device registry,
  file names and listener configuration, as plain data.
"""
