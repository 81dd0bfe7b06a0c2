#!/usr/bin/env python3
"""How fast `sendmail` queues a message, beside the interpreter's own start-up.

    .venv/bin/python bench/enqueue.py [--runs 60] [--messages 1000]

Prints the median wall time of one `sendmail` enqueue (a cron-sized message, as Debian cron calls it) and of
`python -c pass` and `python -S -c pass` with the same interpreter, measured interleaved in the same run so
that machine noise hits all alike; then the sequential enqueue rate for --messages messages. The target
(issue 2) is an enqueue within 1.5x of `python -c pass`. Absolute numbers drift ~25% between runs on shared
machines: compare within one run. Everything happens in a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MESSAGE = (
    b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> run-parts /etc/cron.daily\n"
    b"MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: 8bit\n"
    b"X-Cron-Env: <SHELL=/bin/sh>\nX-Cron-Env: <HOME=/root>\n\n" + b"job output line\n" * 60
)


def timed(argv: list[str], env: dict[str, str], stdin: bytes) -> float:
    start = time.perf_counter()
    subprocess.run(argv, input=stdin, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=60, help="interleaved runs for the medians")
    parser.add_argument("--messages", type=int, default=1000, help="messages for the enqueue rate")
    args = parser.parse_args()

    bin_dir = Path(sys.executable).parent
    sendmail = str(bin_dir / "sendmail")
    wrapper = Path(sendmail).read_text(errors="replace")
    if "import re" in wrapper:
        print("warning: this sendmail script was written by an old pip and imports re (~7 ms here);")
        print("         upgrade pip (pip install -U pip) and reinstall pymta to measure what users get")
    if "__editable__" in "".join(
        path.name for path in Path(sys.prefix).glob("lib/python*/site-packages/*.pth")
    ):
        print("warning: an editable install adds its import hook to every interpreter start; measure a plain")
        print(
            "         install (python3 -m venv /tmp/v && /tmp/v/bin/pip install -U pip . ) for real numbers"
        )
    with tempfile.TemporaryDirectory(prefix="pymta-bench-") as tmp:
        config = Path(tmp, "pymta.yaml")
        config.write_text(f"spool: {tmp}/spool\ndeliver: queue\n")
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": tmp, "PYMTA_CONFIG": str(config)}
        cases = {
            "sendmail enqueue": ([sendmail, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"], MESSAGE),
            "python -c pass": ([sys.executable, "-c", "pass"], b""),
            "python -S -c pass": ([sys.executable, "-S", "-c", "pass"], b""),
        }
        for argv, stdin in cases.values():  # warm the page cache and write .pyc files
            timed(argv, env, stdin)
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, (argv, stdin) in cases.items():
                samples[name].append(timed(argv, env, stdin))
        medians = {name: statistics.median(values) * 1000 for name, values in samples.items()}

        start = time.perf_counter()
        argv, stdin = cases["sendmail enqueue"]
        for _ in range(args.messages):
            timed(argv, env, stdin)
        rate = args.messages / (time.perf_counter() - start)
        queued = len(os.listdir(Path(tmp, "spool", "new")))

    print(f"python {sys.version.split()[0]} on {os.cpu_count()} cores, {args.runs} interleaved runs")
    for name, value in medians.items():
        print(f"  {name:<20} {value:7.2f} ms median")
    ratio = medians["sendmail enqueue"] / medians["python -c pass"]
    print(f"  enqueue / python -c pass = {ratio:.2f}x (target: within 1.5x)")
    print(f"  sequential enqueue rate: {rate:.0f} messages/s ({args.messages} messages, {queued} queued)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
