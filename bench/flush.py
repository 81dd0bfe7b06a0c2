#!/usr/bin/env python3
"""How fast `pymta flush` delivers, beside the ceiling for Python: a plain smtplib loop over one connection.

    .venv/bin/python bench/flush.py [--messages 2000] [--deferred 10000] [--rounds 7]

1. --messages queued 1 KiB messages delivered by `pymta flush` (the real console script, start-up included,
   and Flusher.run() in this process) to a local sink (bench/sink.py), beside smtplib.SMTP.sendmail() sending
   the same messages over one connection. Target (issue 3): at least 0.8x the smtplib rate.
2. A flush when --deferred messages are deferred and none is due. Target: well under a second.

The three are measured one after the other in each round, so that a ratio compares runs seconds apart: on a
shared machine the speed of the CPU itself drifts by a quarter between minutes. Each figure is the median of
the rounds with the lowest and highest beside it, and each ratio is the median of the rounds' own ratios.
The queue of a round is written (every file fsynced, as sendmail does) and then os.sync()ed before its flush
starts: the flush meets a queue filled earlier, not the journal of the fill still being written out.
Everything happens in a temporary directory and on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pymta.config.load import load
from pymta.delivery.flush import Flusher
from pymta.queue.spool import Spool

SINK = Path(__file__).resolve().parent / "sink.py"

BODY = b"".join(
    b"line %03d of a message of about one kibibyte, as cron or a script would send\r\n" % i for i in range(12)
)


def message(number: int) -> bytes:
    return b"From: bench@example.org\r\nTo: sink@example.net\r\nSubject: bench %d\r\n\r\n" % number + BODY


def envelope() -> dict[str, object]:
    return {
        "sender": "bench@example.org",
        "recipients": ["sink@example.net"],
        "submitted_by": "bench",
        "uid": os.getuid(),
        "full_name": "",
        "queued_at": time.time(),
        "notify": None,
        "ret": None,
        "envid": None,
        "body_type": None,
    }


def fill(spool: Spool, count: int) -> None:
    for number in range(count):
        spool.submit(envelope(), message(number))


def smtplib_rate(port: int, count: int) -> float:
    messages = [message(number) for number in range(count)]
    start = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("bench.example.org")
        for data in messages:
            client.sendmail("bench@example.org", ["sink@example.net"], data)
    return count / (time.perf_counter() - start)


def spread(values: list[float], scale: float = 1.0, digits: int = 0, unit: str = "") -> str:
    """`median<unit> (lowest-highest)` of `values` times `scale`."""
    low, mid, high = (
        f"{value * scale:.{digits}f}" for value in (min(values), statistics.median(values), max(values))
    )
    return f"{mid}{unit} ({low}-{high})"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--deferred", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    pymta = str(Path(sys.executable).parent / "pymta")

    rates: dict[str, list[float]] = {"smtplib": [], "pymta flush": [], "Flusher.run": []}
    # The sink runs in a process of its own, as a real smarthost would: in this process it would share the
    # interpreter lock with the client being measured.
    sink = subprocess.Popen(
        [sys.executable, str(SINK)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert sink.stdout is not None and sink.stdin is not None
    port = int(sink.stdout.readline())
    with tempfile.TemporaryDirectory(prefix="pymta-bench-") as tmp:
        config_path = Path(tmp, "pymta.yaml")
        config_path.write_text(
            f"spool: {tmp}/spool\nhostname: bench.example.org\ndeliver: queue\n"
            f"smarthosts:\n  - host: 127.0.0.1\n    port: {port}\n    security: none\n"
        )
        env = {**os.environ, "PYMTA_CONFIG": str(config_path)}
        config = load(str(config_path))
        spool = Spool(config.spool)
        for _ in range(args.rounds):
            rates["smtplib"].append(smtplib_rate(port, args.messages))
            fill(spool, args.messages)
            os.sync()
            start = time.perf_counter()
            subprocess.run([pymta, "flush"], env=env, check=True)
            rates["pymta flush"].append(args.messages / (time.perf_counter() - start))
            fill(spool, args.messages)
            os.sync()
            start = time.perf_counter()
            report = Flusher(config).run()
            rates["Flusher.run"].append(args.messages / (time.perf_counter() - start))
            assert report.sent == args.messages, report
        assert spool.entries() == ([], []), "not everything was delivered"

        # --deferred messages, every one deferred and due in an hour.
        fill(spool, args.deferred)
        spool.pick_up(config.max_message_size, print)
        later = time.time() + 3600
        for name in spool.due(time.time()):
            spool.write_state(name, {"state": "deferred", "attempts": 1}, later)
        idle_process, idle_run = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            subprocess.run([pymta, "flush"], env=env, check=True)
            idle_process.append(time.perf_counter() - start)
            start = time.perf_counter()
            report = Flusher(config).run()
            idle_run.append(time.perf_counter() - start)
            assert report.attempted == 0, report
        start_only = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            subprocess.run([pymta, "--version"], env=env, check=True, stdout=subprocess.DEVNULL)
            start_only.append(time.perf_counter() - start)

    sink.stdin.close()
    sink.wait(10)
    print(
        f"python {sys.version.split()[0]}, {args.messages} messages of {len(message(0))} bytes, "
        f"{args.rounds} rounds: median (lowest-highest)"
    )
    for name, values in rates.items():
        line = f"  {name:<12} {spread(values, unit=' messages/s')}"
        if name != "smtplib":
            ratios = [rate / ceiling for rate, ceiling in zip(values, rates["smtplib"], strict=True)]
            line += f", {spread(ratios, digits=2, unit='x')} the same round's smtplib"
        print(line)
    print(
        f"  {args.deferred} deferred, none due: pymta flush {spread(idle_process, 1000, unit=' ms')}, "
        f"process start-up alone {spread(start_only, 1000, unit=' ms')}; "
        f"Flusher.run {spread(idle_run, 1000, unit=' ms')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
