"""From a verified download to a serving model, and back when it misbehaves.

- ``decisions``: the pure decisions (activate, trial verdicts, rollback) over frozen records;
- ``check``: the forked candidate check (load, card, golden vectors);
- ``store``: the state folder (state file, installed models, downloads);
- ``manager``: carries the decisions out against the store and the serving registry.
"""
