"""The pull side: what this device should run, fetched and verified.

- ``metadata``: TUF metadata over retained messages (the sync barrier);
- ``tuf_client``: python-tuf's client without its HTTP stack;
- ``chunks``: one target file as retained chunks, each verified on arrival, resumable;
- ``updater``: refresh, choose releases, download them into the store.
"""
