"""Start-up of ``hiedit serve`` on a real model: the first run (GGUF conversion, RLSEdit's statistics,
migrations) against later runs that find both cached under ``HIEDIT_HOME``.

Spawn to ``/readyz`` 200, through ``bench.common.Server``, in a fresh data directory: one first start,
then ``--rounds`` restarts on the same directory. The LAST line printed is JSON.

    python bench/startup.py                              # SmolLM2-135M-Instruct, the defaults
    python bench/startup.py --model gemma-3-270m --rlsedit off
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Server, emit, load_average  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="--model of hiedit serve")
    parser.add_argument("--rlsedit", default="auto", choices=["auto", "on", "off"], help="--rlsedit of hiedit serve")
    parser.add_argument("--rounds", type=int, default=2, help="later starts on the same data directory")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="hiedit-startup-"))
    flags = ["--model", args.model, "--rlsedit", args.rlsedit, "--probe-every-seconds", "0"]
    times = []
    for i in range(1 + args.rounds):
        server = Server(flags, home)
        try:
            times.append(server.start())
        finally:
            server.stop()
        print(f"start {i + 1}: {times[-1]:.1f} s", file=sys.stderr)
    later = sorted(times[1:])
    return 0 if emit({"model": args.model, "rlsedit": args.rlsedit, "first_start_s": round(times[0], 1),
                      "later_start_s_median": round(later[len(later) // 2], 1) if later else None,
                      "later_starts_s": [round(t, 1) for t in times[1:]], "home": str(home),
                      "load_average": load_average()}) else 1


if __name__ == "__main__":
    sys.exit(main())
