"""Subscriptions as MQTT filters, in words the client's dispatch needs (pure).

Guarantees:

- :func:`has_wildcard` is false only for a subscription that matches nothing but the topic
  spelled the same way (no ``+``, no ``#``, not a ``$share/`` group): the client compares
  those by string and keeps paho's matcher (10 us a call here) for the others;
- :func:`topic_filter_of` strips a shared subscription's ``$share/<group>/`` prefix and leaves
  every other subscription as it is.
"""

from __future__ import annotations


def has_wildcard(subscription: str) -> bool:
    """True for a filter that may match other topics than itself (wildcards, ``$share/``)."""
    return "+" in subscription or "#" in subscription or subscription.startswith("$share/")


def topic_filter_of(subscription: str) -> str:
    """The filter a subscription matches topics with: ``$share/<group>/F`` -> ``F``."""
    if subscription.startswith("$share/"):
        parts = subscription.split("/", 2)
        if len(parts) == 3:
            return parts[2]
    return subscription
