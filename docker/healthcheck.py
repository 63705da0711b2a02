"""Container healthcheck: exit 0 only when GET /health answers 200.

The service answers 503 until the bundle is loaded and warm, so a replica only receives traffic (and compose only
starts what depends on it) once it can score. Standard library only: the slim images carry no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('PAL_PORT', '8000')}/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError as e:  # refused, timed out, DNS: not up yet
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
