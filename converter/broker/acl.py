"""Who may do what on the secure broker: topic grants, ACL and password files.

Pure: every function takes plain values and touches no file, socket or clock
(:func:`new_password` and :func:`hash_password` draw random bytes).

Guarantees:

* a device identity is granted exactly :func:`device_grants` (its own topics,
  replies under its own id, reading the repository and, at a site's broker, that
  site's bridge notification) and the host exactly
  :func:`host_grants`; no device is ever granted another device's topics;
* every topic filter comes from :class:`agent.protocol.Topics`, which owns the
  topic tree: a topic renamed or added there (and listed in its
  ``device_outbound``/``device_inbound``) is granted here without a change;
  :meth:`Grant.allows` matches filters with paho's ``topic_matches_sub``;
* :func:`render_acl` writes one ``user`` block per identity and never a
  ``pattern``, so an identity missing from its input has no rights at all;
* a device may reply only under ``<prefix>/v1/replies/+/<its id>/#``, the rule
  :meth:`agent.protocol.Topics.reply_allowed` checks on the agent's side;
* a site's bridge identity (:func:`site_grants`) may read the repository and
  write exactly what its own devices may write, and its own ``sites/<name>/#``;
  its prune identity (:func:`site_sync_grants`) may only read repository
  metadata. Neither may write the repository or another site's device;
* :func:`hash_password` writes Mosquitto's ``$7$`` (PBKDF2-HMAC-SHA512) format,
  which :func:`verify_password` and Mosquitto both accept.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from paho.mqtt.client import topic_matches_sub

from agent.protocol import Topics
from converter.broker.registry import Registry, site_identity, site_sync_identity

# Mosquitto's own default iteration count. The passwords are 256-bit random
# strings, so key stretching adds nothing against guessing; it only costs CPU
# on every (re)connect of a fleet.
PBKDF2_ITERATIONS = 101
PASSWORD_SALT_BYTES = 12


# -- permissions ---------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """One ACL line: ``access`` is ``read``, ``write`` or ``readwrite`` on a topic filter."""

    access: str
    topic: str

    def allows(self, access: str, topic: str) -> bool:
        return (self.access == "readwrite" or self.access == access) and topic_matches_sub(self.topic, topic)


def device_grants(topics: Topics, device_id: str, site: str | None = None) -> tuple[Grant, ...]:
    """What device ``device_id`` may do: publish its own reports
    (:meth:`~agent.protocol.Topics.device_outbound`) and inference replies; read the
    repository and its own topics (among them :meth:`~agent.protocol.Topics.device_inbound`);
    at site ``site``'s broker, read its bridge's notification (uplink up or down)."""
    return (
        *(Grant("write", t) for t in topics.device_outbound(device_id)),
        Grant("write", topics.reply_filter(device_id)),
        Grant("read", topics.device_filter(device_id)),
        Grant("read", topics.repo_filter),
        *([Grant("read", topics.site(site, "bridge"))] if site else []),
    )


def host_grants(topics: Topics) -> tuple[Grant, ...]:
    """What the host identity may do: write (and read back) the repository and the rollout
    records, read all device topics and replies, send what devices read (inference requests), clear a
    device's retained state."""
    return (
        Grant("readwrite", topics.repo_filter),
        # the rollout controller's retained records (written and read back by host tools)
        Grant("readwrite", topics.rollouts_filter),
        Grant("read", topics.device_filter("+")),
        *(Grant("write", t) for t in topics.device_inbound("+")),
        # an empty retained message clears the row of a removed device
        Grant("write", topics.state("+")),
        Grant("read", topics.replies_filter),
        # central: read each site's link status; a site: its supervisor publishes it
        Grant("readwrite", topics.sites_filter),
    )


def site_grants(topics: Topics, site: str, device_ids: Iterable[str]) -> tuple[Grant, ...]:
    """What site ``site``'s bridge may do at central: read the repository, write its link
    status (``sites/<site>/#``: Mosquitto's notification and the supervisor's status), and
    for each of its devices exactly what :func:`device_grants` lets that device write, plus
    reading what others send it. One line per device: Mosquitto's patterns substitute only
    the username, and device topics name the device, not its site (docs/sites.md)."""
    grants = [Grant("read", topics.repo_filter), Grant("write", topics.site_filter(site))]
    for device_id in device_ids:
        grants += [Grant("write", t) for t in topics.device_outbound(device_id)]
        grants.append(Grant("write", topics.reply_filter(device_id)))
        grants += [Grant("read", t) for t in topics.device_inbound(device_id)]
    return tuple(grants)


def site_sync_grants(topics: Topics) -> tuple[Grant, ...]:
    """What a site's prune may do at central: read the repository's metadata, nothing else."""
    return (Grant("read", topics.metadata_filter),)


def device_acl_entries(
    topics: Topics, registry: Registry, uplink_site: str | None = None
) -> list[tuple[str, tuple[Grant, ...]]]:
    """The device listeners' ACL: one block per device with credentials here (at site
    ``uplink_site``'s broker, with its bridge notification), and per site its bridge's block
    (its devices' topics) and its prune's (docs/sites.md)."""
    entries = [
        (d.device_id, device_grants(topics, d.device_id, uplink_site))
        for d in registry.devices
        if d.site is None
    ]
    for site in registry.sites:
        entries.append(
            (site_identity(site.name), site_grants(topics, site.name, registry.site_devices(site.name)))
        )
        entries.append((site_sync_identity(site.name), site_sync_grants(topics)))
    return entries


def render_acl(entries: Iterable[tuple[str, Sequence[Grant]]]) -> str:
    """Mosquitto ``acl_file`` text: one ``user`` block per identity, no patterns
    (a pattern would keep granting rights to a removed device's valid certificate)."""
    out = ["# generated by litefleet from secure.json; edits are overwritten"]
    for username, grants in entries:
        out.append(f"\nuser {username}")
        out += [f"topic {g.access} {g.topic}" for g in grants]
    return "\n".join(out) + "\n"


# -- passwords -----------------------------------------------------------


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """Mosquitto's ``$7$`` format: PBKDF2-HMAC-SHA512, ``$7$<iter>$<b64 salt>$<b64 hash>``."""
    salt = secrets.token_bytes(PASSWORD_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt, want = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    except ValueError:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]))
    return hmac.compare_digest(got, want)


def new_password() -> str:
    """A 256-bit random password, URL-safe (it may appear in an mqtts:// URL)."""
    return secrets.token_urlsafe(32)


def render_password_file(entries: Mapping[str, str]) -> str:
    """``username:hash`` lines; an empty file is valid (nobody may log in)."""
    return "".join(f"{user}:{hashed}\n" for user, hashed in sorted(entries.items()))
