#!/usr/bin/env python3
"""The delivery loop alone: `Flusher.run()` in this process, beside a plain smtplib loop over one connection.

    .venv/bin/python bench/flush.py [--messages 2000] [--rounds 7]

For work on the loop itself (run it under cProfile, or beside the code before a change): no start-up, no
imports, only what a flush does per message. What users get, the whole `pymta flush` command beside the same
smtplib loop, is measured by bench/compare.py, which this shares its queue, messages and loop with.

The smtplib loop and the flush are measured one after the other in each round, so that a ratio compares
runs seconds apart: on a shared machine the speed of the CPU itself drifts by a quarter between minutes.
Each figure is the median of the rounds with the lowest and highest beside it, and the ratio is the median
of the rounds' own ratios. Everything happens in a temporary directory and on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compare import SINK, Figure, fill, queued, smtplib_loop

from pymta.config.load import load
from pymta.delivery.flush import Flusher


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    smtplib, flusher, ratio = Figure("messages/s"), Figure("messages/s"), Figure("x")
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
            f"spool: {tmp}/spool\nhostname: bench.example.org\ndeliver: queue\naliases: {tmp}/aliases\n"
            f"smarthosts:\n  - host: 127.0.0.1\n    port: {port}\n    security: none\n"
        )
        config = load(str(config_path))
        for _ in range(args.rounds):
            smtplib.samples.append(args.messages / smtplib_loop(port, args.messages))
            fill(Path(config.spool), args.messages)
            start = time.perf_counter()
            report = Flusher(config).run()
            flusher.samples.append(args.messages / (time.perf_counter() - start))
            ratio.samples.append(flusher.samples[-1] / smtplib.samples[-1])
            assert report.sent == args.messages and not queued(Path(config.spool)), report
    sink.stdin.close()
    sink.wait(10)
    rounds = f"{args.messages} messages, {args.rounds} rounds"
    print(f"python {sys.version.split()[0]}, {rounds}: median (lowest-highest)")
    print(f"  smtplib loop  {smtplib.show(0)}")
    print(f"  Flusher.run   {flusher.show(0)}, {ratio.show(2)} the same round's smtplib")
    return 0


if __name__ == "__main__":
    sys.exit(main())
