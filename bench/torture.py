#!/usr/bin/env python3
"""The torture suite: pymta's promise (nothing lost, nothing cut, nothing sent twice) under kill -9, a
smarthost that cuts connections, concurrency, full disks and hostile input.

    .venv/bin/python bench/torture.py [--seed 1] [--scale 1.0] [--only NAME,...] [--findings DIR]

Real processes throughout: the installed `sendmail` and `pymta` console scripts of this interpreter's
environment, in user mode (a temporary config and spool via PYMTA_CONFIG), delivering to a real SMTP server
on 127.0.0.1 (bench/torture_sink.py: aiosmtpd in a process of its own, which keeps every message it receives
whole). Each message carries a unique token (an X-Torture-Token header); the harness counts the copies of
each token that reached the server and compares their bytes with what was submitted. Every experiment
prints one line:

    NAME: acknowledged A, delivered D, duplicates U (allowed X), lost L, corrupt C

and fails on a breach (a lost or corrupt message, a duplicate beyond the allowance, an exit code or an
exception that should not happen), each listed below the line. The experiments and the full run's counts
(`--scale` multiplies them; tests/test_torture.py runs a small slice of each):

    sendmail-kill   1000 trials: `sendmail` killed with SIGKILL at a random moment (while starting, while
                    reading a message of up to 2 MB fed in chunks, or right after its input ended, during
                    the commit). Exit 0 means one complete entry; a killed one leaves a complete entry or
                    none. What a killed writer leaves in tmp/ is aged past STALE_TMP_AGE (the flush removes
                    only tmp/ files older than that, 36 hours) and must be gone after the next flush; then
                    every entry must reach the server once, byte for byte.
    flush-kill      300 kills of `pymta flush --now` at a random moment, over queues of 200 messages (a new
                    queue when one is delivered). At most one duplicate per kill (the window between the
                    server's 250 and the state write), and the flush lock is free after each kill.
    smarthost-drop  1000 messages through a server that cuts a quarter of the transactions: at MAIL, in the
                    middle of the text, after the final dot before its reply, after its reply. A duplicate
                    is allowed only for a message cut after its final dot and before the reply, once per cut.
    concurrency     50 concurrent senders x 20 messages while 4 `pymta flush` loops run: exactly once.
    disk-full       (root: a small tmpfs in a private mount namespace, `unshare -m`; else RLIMIT_FSIZE)
                    `sendmail` into a spool that fills up must exit 0 (and the message is delivered) or
                    73/75 (and nothing is left); then state/ on its own tmpfs fills up during a flush: no
                    acknowledged message may be lost, at most one duplicate per run cut short that way.
    fuzz            200,000 inputs, from a seeded generator, to the sendmail flag parser, message
                    preparation at submission and at delivery, the address parser, the aliases parser,
                    config loading and the `-bs` dialogue: only pymta's own errors (PymtaError) or a
                    documented ValueError may escape, and no input may take more than 1 s (the slowest
                    is reported). Each finding is saved as a Python reproducer under --findings.

Everything happens in temporary directories and on 127.0.0.1; nothing of the machine's is touched.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SINK = HERE / "torture_sink.py"
BIN = Path(sys.executable).parent
SENDER = "torture@example.org"
RECIPIENT = "sink@example.net"
MB = 1 << 20
# The sink's ways of cutting a connection (bench/torture_sink.py FAULTS).
FAULTS = ("after-mail", "mid-data", "dot-noreply", "after-reply")

# The full run's counts; --scale multiplies them.
FULL = {
    "sendmail-kill": 1000,
    "flush-kill": 300,
    "smarthost-drop": 1000,
    "concurrency": 50,  # senders, 20 messages each
    "disk-full": 20,  # rounds of state/ filling up during a flush
    "fuzz": 200_000,
}


# --- accounting ---


@dataclass
class Tally:
    """What one experiment found; `breaches` empty means the promise held."""

    name: str
    acknowledged: int = 0
    delivered: int = 0
    duplicates: int = 0
    allowed_duplicates: int = 0
    lost: int = 0
    corrupt: int = 0
    breaches: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def breach(self, text: str) -> None:
        self.breaches.append(text)

    def line(self) -> str:
        return (
            f"{self.name}: acknowledged {self.acknowledged}, delivered {self.delivered}, duplicates "
            f"{self.duplicates} (allowed {self.allowed_duplicates}), lost {self.lost}, corrupt {self.corrupt}"
            f" [{self.seconds:.0f} s]"
        )

    def report(self) -> str:
        lines = [self.line(), *(f"    {note}" for note in self.notes)]
        lines += [f"    BREACH: {text}" for text in self.breaches[:20]]
        if len(self.breaches) > 20:
            lines.append(f"    ... and {len(self.breaches) - 20} more breaches")
        return "\n".join(lines)

    @property
    def ok(self) -> bool:
        return not self.breaches


def account(
    tally: Tally,
    expected: dict[str, bytes],
    copies: dict[str, list[bytes]],
    allowed: dict[str, int] | None = None,
    allowed_total: int | None = None,
) -> None:
    """Compare what the server received (`copies` by token) with what was acknowledged (`expected`).

    A duplicate is allowed for a token up to `allowed[token]` times, or (`allowed_total`) up to that many in
    all; a copy of a token nobody acknowledged (a killed sendmail's committed entry) is not a breach by
    itself, but a second copy of it is a duplicate like any other."""
    tally.acknowledged += len(expected)
    extra = 0
    for token, bodies in copies.items():
        want = expected.get(token)
        for body in bodies:
            if want is not None and body != want:
                tally.corrupt += 1
                tally.breach(
                    f"token {token}: a copy of {len(body)} bytes differs from the {len(want)} submitted"
                )
        if token in expected:
            tally.delivered += 1
        surplus = len(bodies) - 1
        if surplus > 0:
            tally.duplicates += surplus
            if allowed is not None:
                over = surplus - allowed.get(token, 0)
                if over > 0:
                    tally.breach(
                        f"token {token}: {len(bodies)} copies, {allowed.get(token, 0)} duplicates allowed"
                    )
            extra += surplus
    for token in expected:
        if token not in copies:
            tally.lost += 1
            tally.breach(f"token {token}: acknowledged, never delivered")
    if allowed is not None:
        tally.allowed_duplicates += sum(allowed.values())
    if allowed_total is not None:
        tally.allowed_duplicates += allowed_total
        if extra > allowed_total:
            tally.breach(f"{extra} duplicates, more than the {allowed_total} allowed")
    if allowed is None and allowed_total is None and extra:
        tally.breach(f"{extra} duplicates where none is allowed")


# --- messages ---


class Messages:
    """Messages with a unique token each, already in the form pymta stores and sends (CRLF, Date,
    Message-ID and a qualified From present, no Bcc, lines under 998 octets): what the server receives must
    be these bytes exactly."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def make(self, size: int) -> tuple[str, bytes]:
        token = f"{self.rng.getrandbits(128):032x}"
        head = (
            f"From: Torture <{SENDER}>\r\nTo: {RECIPIENT}\r\nSubject: torture {token[:8]}\r\n"
            f"Date: Mon, 07 Dec 2026 01:00:00 +0000\r\nMessage-ID: <{token}@torture.example.org>\r\n"
            f"X-Torture-Token: {token}\r\n\r\n"
        ).encode()
        # Lines of random length, some starting with a dot (dot-stuffing) or "From " (mbox quoting).
        seed = self.rng.getrandbits(32)
        line_rng = random.Random(seed)
        parts = [head]
        total = len(head)
        alphabet = b"abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:-_=+/"
        chunk = bytes(line_rng.choice(alphabet) for _ in range(4096))
        while total < size:
            length = line_rng.randint(0, 200)
            start = line_rng.randint(0, len(chunk) - length)
            prefix = line_rng.choice((b"", b"", b"", b"", b".", b"..", b"From "))
            line = prefix + chunk[start : start + length] + b"\r\n"
            parts.append(line)
            total += len(line)
        return token, b"".join(parts)

    def size(self, largest: int, smallest: int = 200) -> int:
        """A size between `smallest` and `largest`, uniform in its logarithm: most small, some large."""
        return int(math.exp(self.rng.uniform(math.log(smallest), math.log(largest))))


def said(stderr: bytes | None) -> str:
    """The end of what a process said on stderr, for a breach line."""
    return (stderr or b"").decode(errors="replace").strip()[-300:]


def token_of(data: bytes) -> str | None:
    marker = b"X-Torture-Token: "
    start = data.find(marker, 0, 65536)
    if start < 0:
        return None
    end = data.find(b"\r\n", start)
    return data[start + len(marker) : end].decode("ascii", "replace")


# --- the server ---


class Sink:
    """bench/torture_sink.py in its own process: `port`, and `copies()` of what it kept, by token."""

    def __init__(self, root: Path, *, fault_rate: float = 0.0, faults: str = "", seed: int = 0) -> None:
        self.out = root / f"sink-{os.urandom(4).hex()}"
        argv = [sys.executable, str(SINK), "--out", str(self.out), "--seed", str(seed)]
        if fault_rate:
            argv += ["--fault-rate", str(fault_rate), "--faults", faults]
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.process.kill()
            raise RuntimeError(f"the sink did not start (said {line!r}); is aiosmtpd installed?")
        self.port = int(line)

    def copies(self) -> dict[str, list[bytes]]:
        found: dict[str, list[bytes]] = {}
        received = self.out / "received"
        for path in sorted(received.iterdir()) if received.exists() else []:
            if path.suffix == ".part":
                continue
            data = path.read_bytes()
            found.setdefault(token_of(data) or f"no-token-{path.name}", []).append(data)
        return found

    def faults(self) -> list[tuple[str, str]]:
        path = self.out / "faults.log"
        if not path.exists():
            return []
        return [tuple(line.split(" ", 1)) for line in path.read_text().splitlines() if line]  # type: ignore[misc]

    def forget(self) -> None:
        """Throw away what was received so far (between rounds: keeps the disk use small)."""
        received = self.out / "received"
        for path in received.iterdir() if received.exists() else []:
            path.unlink()

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


# --- a pymta installation in a temporary directory ---


class Mta:
    """A user-mode pymta: config, spool, environment, and the console scripts run as real processes."""

    def __init__(self, root: Path, port: int, extra: str = "", spool: Path | None = None) -> None:
        self.root = root
        self.spool = spool or root / "spool"
        self.config = root / "pymta.yaml"
        (root / "mail").mkdir(exist_ok=True)
        (root / "home").mkdir(exist_ok=True)
        self.config.write_text(
            f"spool: {self.spool}\nhostname: torture.example.org\ndomain: example.org\ndeliver: queue\n"
            f"local:\n  mailbox: mbox\n  mail_spool: {root / 'mail'}\n  maildir: {root}/Maildir\n"
            f"aliases: {root / 'aliases'}\n"
            f"smarthosts:\n  - host: 127.0.0.1\n    port: {port}\n    security: none\n{extra}"
        )
        self.env = {
            "PATH": f"{BIN}:/usr/bin:/bin",
            "HOME": str(root / "home"),
            "PYMTA_CONFIG": str(self.config),
            "LANG": "C.UTF-8",
        }

    def script(self, name: str) -> str:
        path = BIN / name
        if not path.exists():
            raise RuntimeError(f"{path} is missing: install pymta first (pip install -e '.[test]')")
        return str(path)

    def start(self, program: str, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen([self.script(program), *args], env=self.env, **kwargs)  # type: ignore[call-overload,no-any-return]

    def run(
        self, program: str, *args: str, input: bytes = b"", timeout: float = 300
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [self.script(program), *args], env=self.env, input=input, capture_output=True, timeout=timeout
        )

    def sendmail(self, message: bytes) -> subprocess.CompletedProcess[bytes]:
        return self.run("sendmail", "-oi", RECIPIENT, input=message)

    def submit(self, message: bytes) -> str:
        """Queue `message` in this process as sendmail's commit would, but without its fsyncs: the harness
        fills queues fast, and no power is lost here. The entry is the one `Spool.submit` writes."""
        from pymta.queue.directory import encode_json, new_id
        from pymta.queue.entry import ENVELOPE_VERSION
        from pymta.queue.spool import Spool

        spool = Spool(str(self.spool))
        if not spool.exists():
            spool.create_private()
        name = new_id()
        envelope: dict[str, object] = {
            "v": ENVELOPE_VERSION,
            "uid": os.getuid(),
            "id": name,
            "sender": SENDER,
            "recipients": [RECIPIENT],
            "submitted_by": "torture",
            "full_name": "",
            "queued_at": time.time(),
            "notify": None,
            "ret": None,
            "envid": None,
            "body_type": None,
        }
        tmp = self.spool / "tmp" / name
        tmp.write_bytes(encode_json(envelope).encode("ascii") + b"\n" + message)
        tmp.chmod(0o600)
        os.rename(tmp, self.spool / "new" / name)
        return name

    def names(self, location: str) -> list[str]:
        try:
            return sorted(os.listdir(self.spool / location))
        except FileNotFoundError:
            return []

    def waiting(self) -> int:
        """Messages in new/ and queue/ (dot-files are a writer's temporaries, not messages)."""
        return sum(1 for where in ("new", "queue") for name in self.names(where) if not name.startswith("."))

    def drain(self, tally: Tally, runs: int = 50) -> None:
        """`pymta flush --now` until the queue is empty; every run must exit 0."""
        for _ in range(runs):
            if not self.waiting():
                return
            result = self.run("pymta", "flush", "--now")
            if result.returncode != 0:
                tally.breach(f"pymta flush exited {result.returncode}: {said(result.stderr)}")
        if self.waiting():
            tally.breach(f"{self.waiting()} messages still queued after {runs} flushes: {self.status()}")

    def status(self) -> str:
        result = self.run("pymta", "queue", "--json")
        try:
            entries = json.loads(result.stdout)
        except ValueError:
            return result.stderr.decode(errors="replace")[-300:]
        return "; ".join(f"{e['id']} {e['state']} {e['last_error']}" for e in entries[:3])

    def flush_lock_free(self) -> bool:
        from pymta.queue.spool import Spool

        spool = Spool(str(self.spool))
        fd = spool.lock_flush()
        if fd is None:
            return False
        spool.release_flush(fd)
        return True


@contextmanager
def workspace(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"pymta-torture-{prefix}-") as tmp:
        yield Path(tmp)


Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _timed(run: Callable[..., Tally]) -> Callable[..., Tally]:
    def wrapper(*args: object, **kwargs: object) -> Tally:
        start = time.monotonic()
        tally = run(*args, **kwargs)
        tally.seconds = time.monotonic() - start
        return tally

    wrapper.__name__ = run.__name__
    wrapper.__doc__ = run.__doc__
    return wrapper


# --- 1. kill -9 of sendmail ---


class Lifetimes:
    """How long an unkilled `sendmail` runs, by message size (powers of two): the `late` kills are drawn
    within that time, so that they land in the commit (write, fsync, rename, fsync) and not after it."""

    def __init__(self) -> None:
        self.seen: dict[int, list[float]] = {}

    def add(self, size: int, seconds: float) -> None:
        self.seen.setdefault(size.bit_length(), []).append(seconds)
        del self.seen[size.bit_length()][:-20]

    def typical(self, size: int) -> float:
        recent = self.seen.get(size.bit_length()) or [0.1]
        return sorted(recent)[len(recent) // 2]


def _feed_and_kill(
    process: subprocess.Popen[bytes], data: bytes, plan: str, rng: random.Random, typical: float
) -> None:
    """Write `data` to the process in chunks and kill it as `plan` says: `start` (while the interpreter
    starts), `read` (after a random number of chunks: mid-read), `late` (at 60-105% of the `typical` time
    an unkilled run takes: mostly in the commit), `none`; `interrupt` and `terminate` send SIGINT (a
    Ctrl-C) or SIGTERM at the `late` moment instead of SIGKILL."""
    assert process.stdin is not None
    late = rng.uniform(0.6 * typical, 1.05 * typical)
    delay = {"start": rng.uniform(0.0, 0.3 * typical), "late": late, "interrupt": late, "terminate": late}
    signum = {"interrupt": signal.SIGINT, "terminate": signal.SIGTERM}.get(plan, signal.SIGKILL)
    timer = threading.Timer(delay[plan], process.send_signal, (signum,)) if plan in delay else None
    if timer is not None:
        timer.start()
    chunks = []
    position = 0
    while position < len(data):
        step = rng.choice((4096, 16384, 65536, 262144))
        chunks.append(data[position : position + step])
        position += step
    kill_after = rng.randint(0, max(0, len(chunks) - 1)) if plan == "read" else -1
    try:
        for number, chunk in enumerate(chunks):
            process.stdin.write(chunk)
            process.stdin.flush()
            if number == kill_after:
                process.kill()
                break
    except BrokenPipeError:
        pass  # killed, or it stopped reading: what it did with the input is what is checked
    try:
        process.stdin.close()
    except BrokenPipeError:
        pass
    process.wait()
    if timer is not None:
        timer.cancel()


def _spool_entries(mta: Mta) -> tuple[dict[str, list[bytes]], list[str]]:
    """The messages committed in new/ and queue/, by token, and a line for each file that is not one."""
    from pymta.queue.spool import Spool

    spool = Spool(str(mta.spool))
    found: dict[str, list[bytes]] = {}
    odd = []
    for where in ("new", "queue"):
        for name in mta.names(where):
            if name.startswith("."):
                odd.append(f"{where}/{name}: a temporary file")
                continue
            try:
                entry = spool.read_entry(where, name)
                data = spool.read_message(entry)
            except (OSError, ValueError) as exc:
                odd.append(f"{where}/{name}: {exc}")
                continue
            found.setdefault(token_of(data) or f"no-token:{where}/{name}", []).append(data)
    return found, odd


@_timed
def sendmail_kill(
    trials: int, seed: int, *, largest: int = 2 * MB, batch: int = 100, progress: Progress = _quiet
) -> Tally:
    """kill -9 of `sendmail` at random moments; see the module docstring."""
    from pymta.queue.spool import STALE_TMP_AGE

    tally = Tally("sendmail-kill")
    rng = random.Random(seed)
    messages = Messages(rng)
    outcomes = {
        "exited 0": 0,
        "killed": 0,
        "killed, entry kept": 0,
        "interrupted, said nothing queued": 0,
        "interrupted while starting": 0,
        "tmp leftovers": 0,
    }
    plans = ("none", "start", "read", "read", "late", "late", "late", "interrupt", "terminate")
    lifetimes = Lifetimes()
    with workspace("sendmail") as root:
        sink = Sink(root)
        try:
            mta = Mta(root, sink.port)
            done = 0
            while done < trials:
                expected: dict[str, bytes] = {}
                killed: dict[str, bytes] = {}
                refused: set[str] = set()  # sendmail said so: nothing may be queued
                for _ in range(min(batch, trials - done)):
                    token, data = messages.make(messages.size(largest))
                    process = mta.start(
                        "sendmail", "-oi", RECIPIENT,
                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    )  # fmt: skip
                    plan = rng.choice(plans)
                    started = time.monotonic()
                    _feed_and_kill(process, data, plan, rng, lifetimes.typical(len(data)))
                    if plan == "none" and process.returncode == 0:
                        lifetimes.add(len(data), time.monotonic() - started)
                    stderr = process.stderr.read() if process.stderr else b""
                    if process.stderr:
                        process.stderr.close()
                    if process.returncode == 0:
                        expected[token] = data
                        outcomes["exited 0"] += 1
                    elif process.returncode in (-signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT):
                        killed[token] = data
                        outcomes["killed"] += 1
                    elif process.returncode == 75 and plan == "interrupt":  # "nothing was queued"
                        refused.add(token)
                        outcomes["interrupted, said nothing queued"] += 1
                    elif process.returncode == 1 and b"KeyboardInterrupt" in stderr and plan == "interrupt":
                        # Ctrl-C while the interpreter imports, before sendmail's main() runs: a traceback
                        # and exit 1, from Python itself. Nothing may be queued then either.
                        refused.add(token)
                        outcomes["interrupted while starting"] += 1
                    else:
                        tally.breach(f"sendmail exited {process.returncode}: {said(stderr)}")
                    done += 1
                # What is in the spool: one whole entry per acknowledged message, none or one per killed one.
                entries, odd = _spool_entries(mta)
                for line in odd:
                    tally.corrupt += 1
                    tally.breach(f"a partial or unreadable entry: {line}")
                for token, bodies in entries.items():
                    want = expected.get(token, killed.get(token))
                    if want is None:
                        tally.corrupt += 1
                        tally.breach(f"an entry that no sendmail wrote: {token}")
                    elif any(body != want for body in bodies) or len(bodies) > 1:
                        tally.corrupt += 1
                        tally.breach(f"token {token}: {len(bodies)} entries, not one whole copy")
                for token in refused & set(entries):
                    tally.duplicates += 1
                    tally.breach(
                        f"token {token}: sendmail was interrupted and said nothing was queued, but its "
                        "message is in the spool: the caller will send it again"
                    )
                for token in expected:
                    if token not in entries:
                        tally.breach(f"token {token}: sendmail exited 0 but there is no entry")
                kept = {token: data for token, data in killed.items() if token in entries}
                outcomes["killed, entry kept"] += len(kept)
                # tmp/: what killed writers left. The flush removes files older than STALE_TMP_AGE: age them.
                tmp = mta.spool / "tmp"
                leftovers = mta.names("tmp")
                outcomes["tmp leftovers"] += len(leftovers)
                old = time.time() - STALE_TMP_AGE - 60
                for name in leftovers:
                    os.utime(tmp / name, (old, old))
                sink.forget()
                mta.drain(tally)
                if mta.names("tmp"):
                    tally.breach(f"tmp/ still holds {mta.names('tmp')} after a flush")
                account(tally, expected, {t: c for t, c in sink.copies().items() if t not in kept})
                kept_copies = {t: c for t, c in sink.copies().items() if t in kept}
                for token, data in kept.items():  # a killed sendmail's whole entry is delivered once too
                    bodies = kept_copies.get(token, [])
                    if bodies != [data]:
                        tally.breach(f"token {token} (killed, entry kept): {len(bodies)} copies delivered")
                tally.delivered += len(kept_copies)
                progress(f"sendmail-kill: {done}/{trials} trials, {outcomes}")
        finally:
            sink.stop()
    tally.notes.append(", ".join(f"{key} {value}" for key, value in outcomes.items()))
    tally.notes.append(
        "tmp/ leftovers were aged past STALE_TMP_AGE (36 h) before each flush; none survived it"
        if not any("tmp/" in b for b in tally.breaches)
        else "tmp/ leftovers survived a flush"
    )
    return tally


# --- 2. kill -9 of pymta flush ---


@_timed
def flush_kill(kills: int, seed: int, *, queue: int = 200, progress: Progress = _quiet) -> Tally:
    """kill -9 of `pymta flush --now` at random moments over queues of `queue` messages."""
    tally = Tally("flush-kill")
    rng = random.Random(seed)
    messages = Messages(rng)
    expected: dict[str, bytes] = {}
    done = rounds = unkilled = 0
    pace = 1.0
    with workspace("flush") as root:
        sink = Sink(root)
        try:
            mta = Mta(root, sink.port)
            # How long a flush takes to start (an empty queue) and to deliver a message (a first queue,
            # unkilled): the kills are drawn from late in the start-up to the end of the delivery.
            token, data = messages.make(1000)
            mta.submit(data)
            expected[token] = data
            mta.drain(tally)
            started = time.monotonic()
            mta.drain(tally)
            mta.run("pymta", "flush", "--now")
            startup = time.monotonic() - started
            for _ in range(queue):
                token, data = messages.make(messages.size(64 * 1024))
                mta.submit(data)
                expected[token] = data
            started = time.monotonic()
            mta.drain(tally)
            per_message = max(0.001, (time.monotonic() - started - startup) / queue)
            tally.notes.append(
                f"an unkilled flush: {startup * 1000:.0f} ms to start, {per_message * 1000:.1f} ms a message"
            )
            while done < kills:
                if not mta.waiting():
                    rounds += 1
                    for _ in range(queue):
                        token, data = messages.make(messages.size(64 * 1024))
                        mta.submit(data)
                        expected[token] = data
                process = mta.start(
                    "pymta", "flush", "--now", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
                # `pace` follows the machine's speed (shared machines drift): a flush that ran to the end
                # makes the next delays shorter, a kill a little longer.
                delay = pace * rng.uniform(0.6 * startup, startup + per_message * mta.waiting())
                timer = threading.Timer(delay, process.kill)
                timer.start()
                _, stderr = process.communicate()
                timer.cancel()
                if process.returncode == -signal.SIGKILL:
                    done += 1
                    pace = min(2.0, pace * 1.05)
                    if not mta.flush_lock_free():
                        tally.breach("the flush lock was still held after the flush was killed")
                elif process.returncode == 0:
                    unkilled += 1
                    pace = max(0.2, pace * 0.8)
                else:
                    tally.breach(f"pymta flush exited {process.returncode}: {said(stderr)}")
                if done % 25 == 0 and process.returncode == -signal.SIGKILL:
                    progress(f"flush-kill: {done}/{kills} kills over {rounds} queues of {queue}")
            mta.drain(tally)
            debris = [
                f"{where}/{n}" for where in ("queue", "state") for n in mta.names(where) if n.startswith(".")
            ]
            if debris:
                tally.notes.append(
                    f"{len(debris)} temporary files left in queue/ or state/ by killed flushes "
                    f"(harmless: never read, but never removed either), e.g. {debris[0]}"
                )
            account(tally, expected, sink.copies(), allowed_total=done)
        finally:
            sink.stop()
    tally.notes.append(
        f"{done} kills over {rounds} queues of {queue} messages; {unkilled} flushes ran to the end"
    )
    return tally


# --- 3. the smarthost cuts the connection ---


@_timed
def smarthost_drop(
    count: int, seed: int, *, rate: float = 0.25, batch: int = 100, progress: Progress = _quiet
) -> Tally:
    """`count` messages, `batch` at a time, through a server that cuts `rate` of the transactions at one
    of four moments; `pymta flush --now` runs until each batch is delivered."""
    tally = Tally("smarthost-drop")
    rng = random.Random(seed)
    messages = Messages(rng)
    expected: dict[str, bytes] = {}
    runs = 0
    with workspace("drop") as root:
        sink = Sink(root, fault_rate=rate, faults=",".join(FAULTS), seed=seed)
        try:
            mta = Mta(root, sink.port)
            while len(expected) < count:
                for _ in range(min(batch, count - len(expected))):
                    token, data = messages.make(messages.size(256 * 1024))
                    mta.submit(data)
                    expected[token] = data
                for _ in range(batch * 2 + 20):
                    if not mta.waiting():
                        break
                    result = mta.run("pymta", "flush", "--now")
                    runs += 1
                    if result.returncode != 0:
                        tally.breach(f"pymta flush exited {result.returncode}: {said(result.stderr)}")
                if mta.waiting():
                    tally.breach(
                        f"{mta.waiting()} messages still queued after {runs} flushes: {mta.status()}"
                    )
                    break
                progress(f"smarthost-drop: {len(expected)}/{count} messages delivered, {runs} flush runs")
            faults = sink.faults()
            allowed: dict[str, int] = {}
            for kind, token in faults:
                if kind == "dot-noreply":
                    allowed[token] = allowed.get(token, 0) + 1
            account(tally, expected, sink.copies(), allowed=allowed)
            kinds = {kind: sum(1 for k, _ in faults if k == kind) for kind in FAULTS}
            tally.notes.append(
                f"{len(faults)} cuts in {runs} flush runs: "
                + ", ".join(f"{k} {v}" for k, v in kinds.items())
                + "; a duplicate is allowed only after a cut after the final dot and before the reply"
            )
        finally:
            sink.stop()
    return tally


# --- 4. concurrency ---


@_timed
def concurrency(
    senders: int, seed: int, *, each: int = 20, loops: int = 4, progress: Progress = _quiet
) -> Tally:
    """`senders` threads each running `sendmail` `each` times while `loops` threads run `pymta flush`."""
    tally = Tally("concurrency")
    rng = random.Random(seed)
    messages = Messages(rng)
    plans = [[messages.make(messages.size(32 * 1024)) for _ in range(each)] for _ in range(senders)]
    expected: dict[str, bytes] = {}
    lock = threading.Lock()
    sending = threading.Event()
    sending.set()
    flushes = [0]
    with workspace("concurrency") as root:
        sink = Sink(root)
        try:
            mta = Mta(root, sink.port)

            def sender(plan: list[tuple[str, bytes]]) -> None:
                for token, data in plan:
                    result = mta.sendmail(data)
                    with lock:
                        if result.returncode == 0:
                            expected[token] = data
                        else:
                            tally.breach(f"sendmail exited {result.returncode}: {said(result.stderr)}")

            def flusher() -> None:
                while sending.is_set() or mta.waiting():
                    result = mta.run("pymta", "flush")
                    with lock:
                        flushes[0] += 1
                        if result.returncode != 0:
                            tally.breach(f"pymta flush exited {result.returncode}: {said(result.stderr)}")

            threads = [threading.Thread(target=sender, args=(plan,)) for plan in plans]
            flushers = [threading.Thread(target=flusher) for _ in range(loops)]
            for thread in flushers + threads:
                thread.start()
            for thread in threads:
                thread.join()
            sending.clear()
            for thread in flushers:
                thread.join()
            mta.drain(tally)
            account(tally, expected, sink.copies())
            progress(f"concurrency: {len(expected)} sent, {flushes[0]} flush runs")
        finally:
            sink.stop()
    tally.notes.append(f"{senders} senders x {each} messages, {loops} flush loops ({flushes[0]} flush runs)")
    return tally


# --- 5. disk full ---


def can_mount_tmpfs() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None and shutil.which("mount") is not None


@_timed
def disk_full(rounds: int, seed: int, *, progress: Progress = _quiet) -> Tally:
    """A full spool under `sendmail`, then a full state/ during flushes. As root, on small tmpfs mounts in a
    private mount namespace (`unshare -m`, so nothing leaks); otherwise with RLIMIT_FSIZE."""
    if can_mount_tmpfs():
        argv = ["unshare", "-m", "--propagation", "private", sys.executable, __file__,
                "--inner-disk-full", str(rounds), "--seed", str(seed)]  # fmt: skip
        start = time.monotonic()
        result = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
        lines = result.stdout.strip().splitlines()
        try:
            data = json.loads(lines[-1])
        except (IndexError, ValueError):
            tally = Tally("disk-full")
            tally.breach(
                f"the experiment in its mount namespace failed ({result.returncode}): {result.stderr[-800:]}"
            )
            return tally
        for line in lines[:-1]:
            progress(line)
        tally = Tally(**data)
        tally.seconds = time.monotonic() - start
        return tally
    return _disk_full_rlimit(rounds, seed, progress)


_MOUNTS: list[Path] = []


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    _MOUNTS.append(path)


def _unmount_all() -> None:
    while _MOUNTS:
        subprocess.run(["umount", "-l", str(_MOUNTS.pop())], check=False)


def _fill(path: Path, name: str = ".ballast") -> Path:
    """Fill the file system of `path` to the last byte with one file; return it. (A dot-file: the spool
    ignores those.)"""
    ballast = path / name
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        block = bytes(65536)
        while block:
            try:
                os.write(fd, block)
            except OSError:
                block = block[: len(block) // 2]
    finally:
        os.close(fd)
    return ballast


def _inner_disk_full(rounds: int, seed: int) -> Tally:
    """The disk-full experiment inside its own mount namespace (we are root there): (a) a spool on a 4 MiB
    tmpfs filled by `sendmail`, (b) a queue whose state/ is a 1 MiB tmpfs filled while a flush delivers."""
    tally = Tally("disk-full")
    rng = random.Random(seed)
    messages = Messages(rng)
    codes: dict[int, int] = {}
    with workspace("disk") as root:
        sink = Sink(root)
        try:
            fs = root / "spoolfs"
            _mount_tmpfs(fs, "4m")
            mta = Mta(root, sink.port, spool=fs / "spool")
            expected: dict[str, bytes] = {}
            stuck = 0
            cycles = max(1, rounds // 2)
            for cycle in range(cycles):
                reserve = fs / "reserve"  # space an admin can free: not part of the spool
                reserve.write_bytes(bytes(512 * 1024))
                refused_in_a_row = 0
                while refused_in_a_row < 4:
                    token, data = messages.make(messages.size(400 * 1024, 2000))
                    result = mta.sendmail(data)
                    codes[result.returncode] = codes.get(result.returncode, 0) + 1
                    if result.returncode == 0:
                        expected[token] = data
                        refused_in_a_row = 0
                        continue
                    refused_in_a_row += 1
                    if result.returncode not in (73, 75):
                        tally.breach(
                            f"sendmail on a full spool exited {result.returncode}, not 73 or 75: "
                            f"{said(result.stderr)}"
                        )
                    if token in _spool_entries(mta)[0]:
                        tally.breach(
                            f"sendmail exited {result.returncode} but its message {token} was queued"
                        )
                if mta.names("tmp"):
                    tally.breach(f"a refused sendmail left {mta.names('tmp')} in tmp/")
                for line in _spool_entries(mta)[1]:
                    tally.corrupt += 1
                    tally.breach(f"a partial or unreadable entry on a full spool: {line}")
                # A spool filled to the brim by sendmail: can the flush deliver, and so make room?
                result = mta.run("pymta", "flush", "--now")
                if result.returncode != 0 and mta.waiting():
                    stuck += 1
                    last_error = result.stderr.decode(errors="replace").strip().splitlines()[-1:]
                reserve.unlink()
                mta.drain(tally)
                print(
                    f"disk-full: spool cycle {cycle + 1}/{cycles}, {len(expected)} acknowledged", flush=True
                )
            account(tally, expected, sink.copies())
            if stuck:
                tally.notes.append(
                    f"LIVENESS: in {stuck} of {cycles} cycles the spool sendmail filled stopped the flush "
                    f"({last_error[0][:200] if last_error else '?'}); it delivered once space was freed"
                )
            sink.forget()
            acknowledged_a = len(expected)

            # (b) state/ fills up while a flush delivers: state/ is a small file system of its own.
            (root / "b").mkdir()
            mta_b = Mta(root / "b", sink.port)
            mta_b.submit(messages.make(300)[1])  # creates the spool
            mta_b.drain(Tally("warm-up"))
            sink.forget()
            state = mta_b.spool / "state"
            _mount_tmpfs(state, "1m")
            expected_b: dict[str, bytes] = {}
            cut_short = 0
            for number in range(rounds):
                for _ in range(100):
                    token, data = messages.make(messages.size(16 * 1024))
                    mta_b.submit(data)
                    expected_b[token] = data
                process = mta_b.start(
                    "pymta", "flush", "--now", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
                time.sleep(rng.uniform(0.2, 1.0))  # the moment the disk fills: mostly during the run
                ballast = _fill(state)
                _, stderr = process.communicate()
                if process.returncode != 0:
                    cut_short += 1
                    if process.returncode not in (73, 75):
                        tally.breach(f"a flush on a full state/ exited {process.returncode}: {said(stderr)}")
                ballast.unlink()
                mta_b.drain(tally)
                print(
                    f"disk-full: state/ round {number + 1}/{rounds}, {cut_short} flushes cut short",
                    flush=True,
                )
            account(tally, expected_b, sink.copies(), allowed_total=cut_short)
            tally.notes.append(
                f"spool on a 4 MiB tmpfs: sendmail exits {dict(sorted(codes.items()))}, {acknowledged_a} "
                f"acknowledged; state/ on a 1 MiB tmpfs filled during {rounds} flushes, {cut_short} of them "
                "cut short (one duplicate allowed for each)"
            )
        finally:
            sink.stop()
            _unmount_all()
    return tally


def _disk_full_rlimit(rounds: int, seed: int, progress: Progress) -> Tally:
    """Without root: sendmail under RLIMIT_FSIZE (a file size limit it cannot write past)."""
    import resource

    tally = Tally("disk-full")
    rng = random.Random(seed)
    messages = Messages(rng)
    codes: dict[int, int] = {}
    with workspace("disk") as root:
        sink = Sink(root)
        try:
            mta = Mta(root, sink.port)
            expected: dict[str, bytes] = {}
            for _ in range(rounds * 10):
                token, data = messages.make(messages.size(400 * 1024, 2000))
                limit = rng.randint(1000, 400 * 1024)

                def cap(limit: int = limit) -> None:
                    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

                result = subprocess.run(
                    [mta.script("sendmail"), "-oi", RECIPIENT], input=data, env=mta.env,
                    capture_output=True, preexec_fn=cap,
                )  # fmt: skip
                codes[result.returncode] = codes.get(result.returncode, 0) + 1
                if result.returncode == 0:
                    expected[token] = data
                elif result.returncode not in (73, 75):
                    tally.breach(
                        f"sendmail over RLIMIT_FSIZE exited {result.returncode}: {result.stderr[-200:]!r}"
                    )
            if mta.names("tmp"):
                tally.breach(f"a refused sendmail left {mta.names('tmp')} in tmp/")
            mta.drain(tally)
            account(tally, expected, sink.copies())
            tally.notes.append(
                f"RLIMIT_FSIZE (not root): sendmail exit codes {dict(sorted(codes.items()))}; "
                "state/ filling during a flush needs root (a tmpfs): not run"
            )
            progress(tally.notes[-1])
        finally:
            sink.stop()
    return tally


# --- 6. fuzzing ---

# Pieces that parsers trip on, mixed into the inputs.
SPICE_TEXT = (
    "\r",
    "\n",
    "\r\n",
    "\0",
    "\t",
    " ",
    '"',
    "\\",
    "<",
    ">",
    "(",
    ")",
    "[",
    "]",
    "@",
    ",",
    ";",
    ":",
    ".",
    "=?utf-8?q?=C3=A9?=",
    "=?x?b?",
    "é",
    "\u2028",
    "\ufeff",
    "\udc80",
    "\udcff",
    "\x7f",
    "\x85",
    "%",
    "!",
    "--",
    "-",
    "'",
    "#",
    "{",
    "}",
    "&",
    "*",
    "|",
    "/",
    "~",
    "\U0001f4e7",
    "a" * 300,
    "(" * 50,
    "<" * 50,
)
SPICE_BYTES = tuple(piece.encode("utf-8", "surrogateescape") for piece in SPICE_TEXT) + (
    b"\xff",
    b"\x80",
    b"\xc3",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\r\n\r\n",
    b"From ",
    b"X" * 1200,
)


class Mutator:
    """Seeded mutations of seed inputs: replace, insert, repeat, cut and splice."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def mutate(self, data: bytes, corpus: list[bytes], largest: int = 4 * MB) -> bytes:
        rng = self.rng
        for _ in range(rng.choice((0, 1, 1, 2, 3, 5, 8))):
            position = rng.randint(0, len(data))
            choice = rng.random()
            if choice < 0.3:
                data = data[:position] + rng.choice(SPICE_BYTES) + data[position:]
            elif choice < 0.45 and data:
                data = data[:position] + bytes([rng.randrange(256)]) + data[position + 1 :]
            elif choice < 0.6 and data:
                end = min(len(data), position + rng.randint(1, 64))
                data = data[:position] + data[end:]
            elif choice < 0.75 and data:
                end = min(len(data), position + rng.randint(1, 200))
                times = rng.choice((2, 3, 10, 100, 1000))
                data = data[:position] + data[position:end] * times + data[end:]
            elif choice < 0.85:
                other = rng.choice(corpus)
                cut = rng.randint(0, len(other))
                data = data[:position] + other[cut:]
            else:
                data = data[:position]
        return data[:largest]


def _mime(rng: random.Random, depth: int) -> bytes:
    """A multipart message nested `depth` deep, with long lines at the bottom."""
    head = b"From: a@example.org\r\nTo: b@example.net\r\nMIME-Version: 1.0\r\n"
    inner = b"Content-Type: text/plain\r\n\r\n" + b"x" * rng.choice((10, 1200, 5000)) + b"\r\n"
    for level in range(depth):
        boundary = b"b%d" % level
        inner = (
            b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n--' + boundary + b"\r\n"
            + inner + b"\r\n--" + boundary + b"--\r\n"
        )  # fmt: skip
    return head + inner


MESSAGE_SEEDS = [
    b'From: a@example.org\nTo: b@example.net, c\nCc: "D, E" <d@x.org>\nBcc: secret@x.org\n'
    b"Subject: hi\n\nbody\n",
    b"Subject: no separator\nbody line without a blank\n",
    b"From someone Mon Dec  7 00:00:00 2026\nTo: root\n\n.\n..\nFrom me\n",
    b"To: undisclosed-recipients:;\nResent-To: r@x.org\nResent-Bcc: s@x.org\n\n",
    b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
    + "é".encode() * 800
    + b"\n",
    b"Content-Type: text/plain\nContent-Transfer-Encoding: quoted-printable\n\n" + b"=41" * 600 + b"\n",
    b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n" + b"QUJD" * 400 + b"\n",
    b"Subject: " + b"folded " * 300 + b"\n\nx\n",
    b"\n\njust a body\n",
    b"",
]
ADDRESS_SEEDS = [
    b"a@example.org",
    b"Name <a@example.org>",
    b'"Q, uoted" <a@x.org>, b@y.org',
    b"group: a@x, b@y;",
    b"root",
    b"<>",
    b"a@[127.0.0.1]",
    b"(comment) a@x.org (c2)",
    b'"a b"@x.org',
    b"a@x.org, , ;b@y.org",
    "jöe@exämple.org".encode(),
    b"<@route:a@x.org>",
    b"=?utf-8?q?N=C3=A4me?= <a@x.org>",
]
ALIASES_SEEDS = [
    b"# comment\npostmaster: root\nroot: admin@example.org, \\root\nlist: a, b,\n  c@x.org\n",
    b"loop: loop2\nloop2: loop\nprog: |/bin/true\nfile: /tmp/x\ninc: :include:INCLUDE\n",
    b'"quoted name": a\nMAILER-DAEMON: postmaster\nabuse: root\n',
    b"a:\nb: c d\n:\n::\n",
]
CONFIG_SEEDS = [
    b"spool: /tmp/spool\nhostname: h.example.org\ndomain: example.org\ndeliver: queue\n",
    b"smarthosts:\n  - host: smtp.web.de\n    port: 587\n    security: starttls\n    username: me@web.de\n"
    b"    password: {env: PW}\nretry:\n  schedule: [1m, 5m, 1h]\n  lifetime: 5d\n",
    b"max_message_size: 10M\nmax_queued_per_user: 3\nsender_policy: strict\nadmin: admin@example.org\n",
    b"spool: '/tmp/a b'\nspool: \"/tmp/c\"\n",
    b"local:\n  mailbox: maildir\n  maildir: ~/Maildir\naliases: /etc/aliases\n"
    b"local_domains: [a.org, b.org]\n",
    b"&a x: *a\n!!python/object:os.system ls\n",
]
SENDMAIL_FLAGS = [
    "-t",
    "-i",
    "-oi",
    "-f",
    "-r",
    "-F",
    "-B",
    "-N",
    "-R",
    "-V",
    "-C",
    "-b",
    "-o",
    "-q",
    "-odq",
    "-oem",
    "-bm",
    "-bp",
    "-bs",
    "-bi",
    "-v",
    "--",
    "-",
    "-ti",
    "-fX",
    "-Btoo",
    "-Nnever",
    "-q30m",
    "-m",
    "-U",
    "-A",
    "-L",
    "-X",
    "-h",
    "-O",
    "-p",
    "-e",
    "-x",
    "--help",
    "-I",
    "-G",
]
BS_SEEDS = [
    b"EHLO client.example\r\nMAIL FROM:<a@x.org> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<b@y.org>\r\n"
    b"DATA\r\nSubject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n",
    b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<root>\r\nRCPT TO:<x@y> NOTIFY=NEVER\r\n"
    b"DATA\r\n..dot\r\n\n.\n\r\n.\r\n",
    b"EHLO x\r\nMAIL FROM:<a@x> SMTPUTF8\r\nRCPT TO:<j\xc3\xb6@x>\r\nDATA\r\n"
    + b"y" * 1200
    + b"\r\n.\r\nRSET\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\nunterminated",
    b"NOOP\r\nVRFY root\r\nHELP\r\nEXPN x\r\nSTARTTLS\r\nAUTH PLAIN\r\nBDAT 10\r\nmail from:<A@X>\r\n",
]


@dataclass
class Target:
    """One fuzzed entry point: what it is fed, and which errors it may raise. `largest` is the size of the
    largest input it meets for real (an argv word: 128 KiB, the kernel's MAX_ARG_STRLEN; a config or
    aliases file, an address: 64 KiB; a message or a -bs session: 1 MiB here, beyond which time grows
    with the size)."""

    name: str
    seeds: list[bytes]
    call: Callable[[bytes, random.Random], object]
    allowed: tuple[type[BaseException], ...]
    largest: int = 64 * 1024


def _fuzz_targets(workdir: Path) -> list[Target]:
    from pymta.config import aliases, expansion
    from pymta.config.load import loads
    from pymta.errors import PymtaError, SpoolError, SpoolFullError
    from pymta.mail import linefit, message
    from pymta.mail.address import parse_envelope_address, parse_list, recipients_from_args
    from pymta.submission import invocation, smtpd, submit

    include = workdir / "include"
    include.write_text("a@x.org\nb\n")
    include.chmod(0o600)
    config_file = workdir / "config.yaml"

    def text(data: bytes) -> str:
        return data.decode("utf-8", "surrogateescape")  # as argv and files reach pymta

    def sendmail_args(data: bytes, rng: random.Random) -> object:
        words = [text(word) for word in data.split(b"\0")]
        return invocation.parse_args(words)

    def submission(data: bytes, rng: random.Random) -> object:
        unreadable: list[str] | None = [] if rng.random() < 0.5 else None
        return message.prepare_submission(data, extract_recipients=rng.random() < 0.7, unreadable=unreadable)

    def delivery(data: bytes, rng: random.Random) -> object:
        stored, _ = message.prepare_submission(data, extract_recipients=False, unreadable=[])
        names = ["Jöe \udcff", "", "A, B", '"q"', "=?x?q?y?=", "a" * 200]
        completed = message.complete(
            stored, queued_at=rng.uniform(0, 4e9), message_id=f"{rng.getrandbits(96):024x}",
            sender=rng.choice(["", "a@x.org", "bare", "j\udcc3@x"]), submitted_by="user",
            full_name=rng.choice(names), domain=rng.choice(["example.org", ""]), hostname="h.example.org",
        )  # fmt: skip
        fitted = linefit.fit_line_length(completed)
        return message.rewrite_from(
            fitted, "account@example.org", rng.choice(["x-original-from", "reply-to", "drop"])
        )

    def address(data: bytes, rng: random.Random) -> object:
        value = text(data)
        kind = rng.randrange(3)
        if kind == 0:
            return parse_list(value)
        if kind == 1:
            return parse_envelope_address(value)
        return recipients_from_args(value.split("\0"))

    def alias_file(data: bytes, rng: random.Random) -> object:
        parsed = aliases.parse(text(data.replace(b"INCLUDE", str(include).encode())))
        names = [name for name in list(parsed.entries)[:5]] + ["root", "postmaster"]
        return [
            expansion.resolve(parsed, name, local_domains=["localhost", "h.example.org"]) for name in names
        ]

    def config_text(data: bytes, rng: random.Random) -> object:
        if rng.random() < 0.5:
            return loads(data, "fuzz.yaml")
        config_file.write_bytes(data)  # as sendmail reads it: no YAML where possible, never fails
        return submit.read_settings(str(config_file))

    def bs_dialogue(data: bytes, rng: random.Random) -> object:
        queued: list[str] = []
        failure = rng.choice([None, None, None, SpoolFullError("disk full"), SpoolError("cannot write")])

        def queue(sender: str, recipients: list[str], body_type: str | None, text: bytes) -> str:
            message.prepare_submission(text, extract_recipients=False, unreadable=[])
            if failure is not None:
                raise failure
            queued.append(sender)
            return f"id{len(queued)}"

        refusal = (lambda: "over the limit") if rng.random() < 0.1 else None
        source = workdir / "bs-input"
        source.write_bytes(data)
        fd_in = os.open(source, os.O_RDONLY)
        fd_out = os.open(os.devnull, os.O_WRONLY)
        try:
            session = smtpd.Session(
                fd_in, fd_out, hostname="h.example.org", max_size=rng.choice([100, 10000, 35_000_000]),
                queue=queue, timeout=5, refusal=refusal,
            )  # fmt: skip
            return session.run()
        finally:
            os.close(fd_in)
            os.close(fd_out)

    argv_seeds = [
        b"\0".join(flag.encode() for flag in SENDMAIL_FLAGS[i : i + 3]) + b"\0a@x.org"
        for i in range(0, len(SENDMAIL_FLAGS), 3)
    ]
    return [
        Target("sendmail flags", argv_seeds + ADDRESS_SEEDS, sendmail_args, (PymtaError,), 128 * 1024),
        Target("message at submission", MESSAGE_SEEDS, submission, (PymtaError,), MB),
        Target("message at delivery", MESSAGE_SEEDS, delivery, (PymtaError,), MB),
        Target("address parser", ADDRESS_SEEDS, address, (PymtaError,)),
        Target("aliases parser", ALIASES_SEEDS, alias_file, (PymtaError,)),
        Target("config loading", CONFIG_SEEDS, config_text, (PymtaError,)),
        Target("-bs dialogue", BS_SEEDS, bs_dialogue, (PymtaError,), MB),
    ]


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [frame for frame in frames if "/pymta/" in frame.filename] or frames
    frame = inside[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"


@_timed
def fuzz(
    count: int,
    seed: int,
    *,
    findings: Path | None = None,
    time_limit: float | None = 1.0,
    progress: Progress = _quiet,
) -> Tally:
    """`count` generated inputs, spread over the targets; see the module docstring."""
    tally = Tally("fuzz")
    rng = random.Random(seed)
    stderr = os.dup(2)  # the -bs session notes each cut-off dialogue on stderr: thousands of lines
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 2)
    os.close(quiet)
    try:
        return _fuzz(tally, count, rng, findings, time_limit, progress)
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)


def _fuzz(
    tally: Tally,
    count: int,
    rng: random.Random,
    findings: Path | None,
    time_limit: float | None,
    progress: Progress,
) -> Tally:
    mutator = Mutator(rng)
    seen: dict[tuple[str, str, str], int] = {}
    with workspace("fuzz") as workdir:
        targets = _fuzz_targets(workdir)
        counts = dict.fromkeys((t.name for t in targets), 0)
        slowest: tuple[float, str, int, float] = (0.0, "", 0, 0.0)
        old_limit = sys.getrecursionlimit()
        for number in range(count):
            target = targets[number % len(targets)]
            if target.name.startswith("message") and rng.random() < 0.02:
                data = _mime(rng, rng.choice((5, 50, 120, 400)))  # deep nesting, as a hostile sender sends
            else:
                data = mutator.mutate(rng.choice(target.seeds), target.seeds, target.largest)
            call_seed = rng.getrandbits(32)
            start = time.perf_counter()
            cpu_start = time.process_time()
            try:
                target.call(data, random.Random(call_seed))
            except target.allowed:
                pass
            except Exception as exc:  # noqa: BLE001 - the point: anything else is a finding
                key = (target.name, type(exc).__name__, _where(exc))
                seen[key] = seen.get(key, 0) + 1
                if seen[key] == 1:
                    saved = _save_finding(findings, target, data, call_seed, exc, len(seen))
                    tally.breach(
                        f"{target.name}: {type(exc).__name__} at {key[2]} ({str(exc)[:120]}) "
                        f"on {len(data)} bytes{saved}"
                    )
            finally:
                sys.setrecursionlimit(old_limit)
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu_start
            counts[target.name] += 1
            if cpu > slowest[0]:
                slowest = (cpu, target.name, len(data), elapsed)
            # CPU time: on a shared machine the wall clock also counts other people's work.
            if time_limit is not None and cpu > time_limit:
                saved = _save_finding(findings, target, data, call_seed, None, number)
                tally.breach(f"{target.name}: one input of {len(data)} bytes took {cpu:.2f} s of CPU{saved}")
            if (number + 1) % 20000 == 0:
                progress(f"fuzz: {number + 1}/{count} inputs, {len(seen)} distinct findings")
    tally.acknowledged = 0
    tally.notes.append(f"{count} inputs: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    tally.notes.append(
        f"slowest input: {slowest[0] * 1000:.0f} ms of CPU ({slowest[3] * 1000:.0f} ms wall; {slowest[1]}, "
        f"{slowest[2]} bytes)"
    )
    for (name, kind, where), times in seen.items():
        tally.notes.append(f"finding: {name}: {kind} at {where}, {times} inputs")
    return tally


def _save_finding(
    directory: Path | None, target: Target, data: bytes, seed: int, exc: BaseException | None, number: int
) -> str:
    if directory is None:
        return ""
    directory.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in target.name)
    path = directory / f"{slug}-{number}.py"
    what = f"raises {type(exc).__name__}: {str(exc)[:200]!r}" if exc is not None else "takes over 1 s"
    path.write_text(
        f'"""Torture fuzz finding: {target.name} {what}.\n\n'
        f'Run: .venv/bin/python {path.name} [the bench/ directory, if not {HERE}]"""\n'
        f"import sys\nsys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else {str(HERE)!r})\n"
        f"data = {data!r}\nseed = {seed}\n"
        "import random, tempfile\nfrom pathlib import Path\nfrom torture import _fuzz_targets\n"
        f"target = [t for t in _fuzz_targets(Path(tempfile.mkdtemp())) if t.name == {target.name!r}][0]\n"
        "target.call(data, random.Random(seed))\n"
    )
    return f"; reproducer: {path}"


# --- the full run ---

EXPERIMENTS: dict[str, Callable[..., Tally]] = {
    "sendmail-kill": sendmail_kill,
    "flush-kill": flush_kill,
    "smarthost-drop": smarthost_drop,
    "concurrency": concurrency,
    "disk-full": disk_full,
    "fuzz": fuzz,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of every random choice (default 1)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every trial count (default 1.0)")
    parser.add_argument("--only", default="", help="comma-separated experiments: " + ", ".join(EXPERIMENTS))
    parser.add_argument(
        "--findings", type=Path, default=None, help="where fuzz reproducers go (default: a temp dir)"
    )
    parser.add_argument("--inner-disk-full", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.inner_disk_full is not None:
        tally = _inner_disk_full(args.inner_disk_full, args.seed)
        print(json.dumps(tally.__dict__))
        return 0
    chosen = [name for name in args.only.split(",") if name] or list(EXPERIMENTS)
    unknown = set(chosen) - set(EXPERIMENTS)
    if unknown:
        parser.error(f"unknown experiments {sorted(unknown)}; known: {', '.join(EXPERIMENTS)}")
    findings = args.findings or Path(tempfile.mkdtemp(prefix="pymta-torture-findings-"))

    def progress(line: str) -> None:
        print(f"  [{time.strftime('%H:%M:%S')}] {line}", flush=True)

    print(
        f"pymta torture: python {sys.version.split()[0]}, {os.cpu_count()} cores, seed {args.seed}, "
        f"scale {args.scale}",
        flush=True,
    )
    tallies = []
    for name in chosen:
        count = max(1, round(FULL[name] * args.scale))
        extra: dict[str, object] = {"findings": findings} if name == "fuzz" else {}
        print(f"{name}: {count} ...", flush=True)
        tally = EXPERIMENTS[name](count, args.seed, progress=progress, **extra)
        print(tally.report(), flush=True)
        tallies.append(tally)
    print("\nsummary")
    for tally in tallies:
        print(f"  {'ok    ' if tally.ok else 'BREACH'} {tally.line()}")
    if any(not tally.ok for tally in tallies) and any(t.name == "fuzz" for t in tallies):
        print(f"fuzz reproducers (if any): {findings}")
    return 0 if all(tally.ok for tally in tallies) else 1


if __name__ == "__main__":
    sys.exit(main())
