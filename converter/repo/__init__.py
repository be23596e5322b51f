"""The signed model repository on the host and its way to the broker.

- ``repository``: TUF metadata, keys and targets (sign, rotate, re-sign);
- ``publish``: metadata, chunks and clean-up on the broker.
"""
