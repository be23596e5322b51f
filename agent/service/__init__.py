"""The agent as a process: configuration, the daemon's work loop, systemd's notify protocol, the CLI.

- ``config``: ``agent.toml`` as a frozen dataclass (unknown keys refused);
- ``daemon``: wires delivery, activation, serving and telemetry together and runs the work loop;
- ``work``: the loop's vocabulary and policies (work items, refresh outcomes, retry delays), pure;
- ``sdnotify``: ``READY=1``, ``STATUS=``, ``WATCHDOG=1`` without a dependency;
- ``cli``: ``litefleet-agent`` (owns the console).
"""
