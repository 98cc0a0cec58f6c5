#!/usr/bin/env python3
"""Container health probe for Octograph (used by the image HEALTHCHECK and docker-compose).

Stdlib only, so the image needs no curl. Exits 0 when GET http://127.0.0.1:PORT/PATH answers 2xx.

Port: --port, else $OCTOGRAPH_HEALTH_PORT, else the `--port` given to the octograph process
(read from /proc/1/cmdline, so one image works for both roles), else 8001 for a worker and 8000
for a gateway. Path: --path, else $OCTOGRAPH_HEALTH_PATH, else /livez (liveness: no dependencies).
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request


def _pid1_args() -> list[str]:
    try:
        with open("/proc/1/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def _port_from(args: list[str]) -> int | None:
    for i, arg in enumerate(args):
        if arg == "--port" and i + 1 < len(args) and args[i + 1].isdigit():
            return int(args[i + 1])
        if arg.startswith("--port=") and arg[7:].isdigit():
            return int(arg[7:])
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--path", default=os.environ.get("OCTOGRAPH_HEALTH_PATH", "/livez"))
    parser.add_argument("--timeout", type=float, default=3.0)
    opts = parser.parse_args()

    port = opts.port
    if port is None and os.environ.get("OCTOGRAPH_HEALTH_PORT", "").isdigit():
        port = int(os.environ["OCTOGRAPH_HEALTH_PORT"])
    if port is None:
        args = _pid1_args()
        port = _port_from(args) or (8001 if "worker" in args else 8000)

    url = f"http://127.0.0.1:{port}{opts.path}"
    try:
        with urllib.request.urlopen(url, timeout=opts.timeout) as resp:  # noqa: S310 (loopback)
            return 0 if 200 <= resp.status < 300 else 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)  # noqa: T201
        return 1


if __name__ == "__main__":
    sys.exit(main())
