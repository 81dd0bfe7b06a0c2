"""A minimal SMTP sink for benchmarks: answers every command at once and throws messages away.

Fast enough not to be the bottleneck of a Python client (it does no parsing beyond lines), and it answers
pipelined commands in order, as RFC 2920 asks. Counts the messages it accepted. Loopback only.
"""

from __future__ import annotations

import asyncio
import threading

EXTENSIONS = (
    b"250-sink.invalid\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 100000000\r\n250 ENHANCEDSTATUSCODES\r\n"
)


class Sink:
    """Run with `with Sink() as sink:`; `sink.port` to connect to, `sink.messages` accepted so far."""

    def __init__(self) -> None:
        self.messages = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink.invalid ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(EXTENSIONS)
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                while await reader.readline() not in (b".\r\n", b""):
                    pass
                self.messages += 1
                writer.write(b"250 2.0.0 Ok: queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                break
            else:
                writer.write(b"250 2.0.0 Ok\r\n")
            await writer.drain()
        writer.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._session, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    def __enter__(self) -> Sink:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def main() -> None:
    """Serve in this process until stdin closes, after printing the port: `python bench/sink.py`."""
    import sys

    with Sink() as sink:
        print(sink.port, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
