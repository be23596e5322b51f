"""The one line a command prints after it changed what the broker enforces (ACL, passwords,
CRL) and asked a running Mosquitto to reload (SIGHUP): the same words from every command."""

from __future__ import annotations


def reload_line(pid: int | None, consequence: str = "") -> str:
    """``Running broker reloaded (mosquitto pid N)[: consequence].``, or what happens when
    no broker runs; no trailing newline."""
    if pid is None:
        return "No broker is running; it picks this up when it starts."
    then = f": {consequence}" if consequence else ""
    return f"Running broker reloaded (mosquitto pid {pid}){then}."
