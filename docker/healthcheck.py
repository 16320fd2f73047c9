#!/usr/bin/env python3
"""Container health check: ``hiedit-healthcheck [PATH]`` exits 0 when GET PATH answers 200.

PATH defaults to /healthz (liveness). The port is $HIEDIT_PORT (default 8000). Standard library
only, so it works in the slim image without curl.
"""
import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/healthz"
    port = os.environ.get("HIEDIT_PORT", "8000")
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("HIEDIT_HEALTHCHECK_TIMEOUT", "4"))) as r:
            ok = r.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"{url}: HTTP {r.status}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
