#!/usr/bin/env python3
"""The smarthost of the torture suite (bench/torture.py): aiosmtpd in a process of its own, on 127.0.0.1.

    python bench/torture_sink.py --out DIR [--fault-rate 0.3] [--faults after-mail,mid-data,...] [--seed N]

Prints the port it listens on, then serves until its standard input closes. Every message it receives
whole (up to the final dot) is written to DIR/received/SEQ exactly as it arrived (dot-unstuffed, CRLF): the
torture harness counts the copies of each message by the token in it and compares their bytes. It offers
PIPELINING, as Postfix and every provider's submission server do, so pymta's pipelined path is what is
tortured.

With --fault-rate, each transaction (at its MAIL command) draws whether, and how, the connection is cut:

    after-mail    at MAIL, before any reply: nothing of the message was received
    mid-data      after 354 and a few lines of text: the message is incomplete, so it is not kept
    dot-noreply   after the final dot, before the reply: the message IS kept (a real server may have
                  queued it), and the client cannot know: the one case where a second copy is allowed
    after-reply   right after the 250 to the final dot: kept, and the client was told

Each cut is one line `KIND TOKEN` in DIR/faults.log (TOKEN is '-' when no text was read).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import re
import sys
import threading

from aiosmtpd.smtp import SMTP, Envelope, Session

FAULTS = ("after-mail", "mid-data", "dot-noreply", "after-reply")
TOKEN = re.compile(rb"X-Torture-Token: ([0-9a-f]+)")


def token_of(data: bytes) -> str:
    found = TOKEN.search(data[:65536])
    return found.group(1).decode() if found else "-"


class Recorder:
    """Writes what was received and which faults were played."""

    def __init__(self, out: str, rate: float, faults: tuple[str, ...], seed: int) -> None:
        self.received = os.path.join(out, "received")
        os.makedirs(self.received, exist_ok=True)
        self.faults_log = open(os.path.join(out, "faults.log"), "a", buffering=1)  # noqa: SIM115
        self.rate = rate
        self.faults = faults
        self.random = random.Random(seed)
        self.sequence = 0

    def draw(self) -> str | None:
        if self.faults and self.random.random() < self.rate:
            return self.random.choice(self.faults)
        return None

    def keep(self, data: bytes) -> None:
        self.sequence += 1
        path = os.path.join(self.received, f"{self.sequence:08d}")
        with open(path + ".part", "wb") as handle:
            handle.write(data)
        os.rename(path + ".part", path)

    def fault(self, kind: str, token: str) -> None:
        self.faults_log.write(f"{kind} {token}\n")


class Handler:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", *responses[-1:]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        fault = self.recorder.draw()
        server.torture_fault = fault  # type: ignore[attr-defined]
        if fault == "after-mail":
            self.recorder.fault(fault, "-")
            server.transport.abort()  # type: ignore[union-attr]  # the reply below is never sent
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        assert isinstance(content, bytes)
        self.recorder.keep(content)
        fault = getattr(server, "torture_fault", None)
        if fault == "dot-noreply":
            self.recorder.fault(fault, token_of(content))
            server.transport.abort()  # type: ignore[union-attr]
        elif fault == "after-reply":
            self.recorder.fault(fault, token_of(content))
            # Runs once this coroutine gives the loop back: after the 250 below was written.
            asyncio.get_running_loop().call_soon(server.transport.abort)  # type: ignore[union-attr]
        return "250 2.0.0 OK: queued"


class TortureSMTP(SMTP):
    """aiosmtpd's SMTP with one more fault: the connection cut in the middle of the message text."""

    async def smtp_DATA(self, arg: str) -> None:
        if getattr(self, "torture_fault", None) != "mid-data" or not (
            self.envelope and self.envelope.rcpt_tos
        ):
            await super().smtp_DATA(arg)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        recorder: Recorder = self.event_handler.recorder
        first = b""
        for _ in range(recorder.random.randint(1, 40)):
            line = await self._reader.readuntil(b"\r\n")
            first = first or line
            if line == b".\r\n":
                break
            first += line if len(first) < 4096 else b""
        recorder.fault("mid-data", token_of(first))
        self.transport.abort()  # type: ignore[union-attr]


async def serve(recorder: Recorder) -> None:
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return TortureSMTP(Handler(recorder), hostname="sink.invalid", ident="torture sink", timeout=120)

    server = await loop.create_server(factory, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()

    def watch_stdin() -> None:  # a thread: stdin may be a pipe, a file or /dev/null
        while os.read(0, 4096):
            pass
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    faults = tuple(kind for kind in args.faults.split(",") if kind)
    unknown = set(faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
    logging.disable(logging.CRITICAL)  # aiosmtpd logs every cut connection: expected here
    recorder = Recorder(args.out, args.fault_rate, faults, args.seed)
    asyncio.run(serve(recorder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
