"""python-tuf's client, imported without its HTTP stack.

``tuf.ngclient`` imports its default fetcher, ``Urllib3Fetcher``, and with it
urllib3 (2.1 MB of resident memory, measured) even when the caller supplies
its own fetcher, as the agent always does (metadata arrives over MQTT). On a
small device that is memory for nothing, so this module puts a placeholder
for ``tuf.ngclient.urllib3_fetcher`` in ``sys.modules`` before importing
python-tuf -- unless urllib3 is already loaded, in which case the real module
costs nothing more. The placeholder refuses to be used: an ``Updater`` built
without a fetcher fails loudly instead of reaching for the network.

Import ``Updater`` and ``FetcherInterface`` from here, not from ``tuf.ngclient``.
"""

from __future__ import annotations

import sys
import types
from typing import Any

_NAME = "tuf.ngclient.urllib3_fetcher"

if "urllib3" not in sys.modules and _NAME not in sys.modules:
    _placeholder = types.ModuleType(_NAME)

    class Urllib3Fetcher:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError(
                "the litefleet agent fetches TUF metadata over MQTT; pass fetcher= to the Updater"
            )

    _placeholder.Urllib3Fetcher = Urllib3Fetcher  # type: ignore[attr-defined]
    sys.modules[_NAME] = _placeholder

from tuf.ngclient import Updater  # noqa: E402
from tuf.ngclient.fetcher import FetcherInterface  # noqa: E402

__all__ = ["FetcherInterface", "Updater"]
