"""Runs INSIDE a test machine with the system's python3 (standard library only): one call to
the agent's REST API on 127.0.0.1:8501, printed as JSON ``{"status": N, "body": BASE64}``.

    python3 guest_rest.py get PATH
    python3 guest_rest.py predict MODEL FILE.npy     # POST the .npy as application/x-npy

Exit 0 for an HTTP answer (any status), 3 when nothing answered (the error on stderr).
"""

from __future__ import annotations

import base64
import http.client
import json
import sys


def main(argv: list[str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", 8501, timeout=60)
    try:
        if argv[0] == "get":
            conn.request("GET", argv[1])
        else:
            with open(argv[2], "rb") as fh:
                body = fh.read()
            conn.request(
                "POST",
                f"/v1/models/{argv[1]}:predict",
                body=body,
                headers={"Content-Type": "application/x-npy"},
            )
        resp = conn.getresponse()
        data = resp.read()
    except OSError as exc:
        sys.stderr.write(f"no answer: {exc}\n")
        sys.stdout.write(json.dumps({"status": 0, "body": ""}))
        return 3
    sys.stdout.write(json.dumps({"status": resp.status, "body": base64.b64encode(data).decode()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
