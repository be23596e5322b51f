"""The signed model repository on the host and its way to the broker.

- ``repository``: the folder: TUF metadata, keys and targets (init, push, rotate, re-sign);
- ``state``/``targets``: ``repo.json`` and the signed targets as records, and what a push
  changes (pure);
- ``signing``: keys and the targets -> snapshot -> timestamp signature chain;
- ``publish``: metadata, chunks and clean-up on the broker;
- ``expiry``: when a signed expiry is near enough to warn (and to re-sign root) (pure).
"""
