#!/usr/bin/env python3
"""pymta as its users run it, beside the interpreter's floor and a plain smtplib loop: issue 12's table.

    python3 bench/compare.py [--venv DIR] [--big] [--only PARTS] [--json FILE]

What is measured is what a Debian user gets: `--python` (default /usr/bin/python3) makes a venv and
installs this source tree into it the way the README says (`python3 -m venv DIR && DIR/bin/pip install
-U pip .`, not editable), and the console scripts that pip wrote there are run. Beside them, the
launchers that the README's next step (`pymta setup --launchers`) and `pymta setup` install
(`pymta.setup.launcher`, `-I -S` and an explicit path) are written into a directory of their own and run
the same way. `--venv DIR` installs into DIR (made when missing) and keeps it for the next run.

1. Start-up, interleaved over --runs rounds: one `sendmail` enqueue (a cron-sized message, as Debian's
   cron calls it), `sendmail --version`, and `python3 -c pass`, `-S -c pass`, `-I -S -c pass` of the
   same interpreter. Each figure is a median with the lowest and highest beside it, in ms and peak RSS.
2. --messages sequential enqueues, each a process, in blocks of 100 alternating with as many
   `python3 -c pass`: the rate beside the rate of starting the interpreter.
3. `pymta flush` of --flush queued messages of 1 KiB (the whole command, start-up included) to a sink on
   127.0.0.1 (bench/sink.py, in a process of its own), beside a one-connection smtplib loop sending the
   same messages to the same sink (the loop alone timed, in its own process of the same interpreter);
   --rounds rounds, each ratio taken within its round. Each round also flushes one message: the command's
   fixed cost (start-up, connection, end), and from it the cost of each further message beside the loop's.
   The queue is written straight into new/ in sendmail's on-disk format (`pymta.queue.commit`'s docstring)
   and os.sync()ed before the flush starts. The sink runs on a CPU of its own and the clients on the
   others (`placement`): the smarthost is another machine, and each round trip crosses CPUs as it would
   cross the network. --unpinned leaves them to the scheduler, which may put a client beside the sink on
   one CPU, where a round trip costs almost nothing: the loop then runs two to three times faster.
4. A 30 MB message enqueued and flushed: the peak RSS of each.
5. With --big: the flush of --big-flush (10,000) messages beside the smtplib loop, then --big-queue
   (100,000) messages deferred and not due, written straight into queue/ and state/ as a flush leaves
   them: an idle flush, `pymta queue`, `pymta queue --json` and `mailq` (time, first output, peak RSS);
   then all of them made due and flushed (time and peak RSS). About five more minutes.
6. What sendmail imports, from `-X importtime` of the launcher (the median of --runs/4 runs).

Prints a markdown table with the issue's columns (pymta today, target, met?) and the figures behind it,
and writes everything to --json. The machine is noisy: absolute times drift by a quarter from minute to
minute, so compare ratios within one run. Everything happens in a temporary directory and on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent
SINK = HERE / "sink.py"
MIB = 1024 * 1024

# What Debian's cron pipes into sendmail for a job with output.
CRON_MESSAGE = (
    b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> run-parts /etc/cron.daily\n"
    b"MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: 8bit\n"
    b"X-Cron-Env: <SHELL=/bin/sh>\nX-Cron-Env: <HOME=/root>\n\n" + b"job output line\n" * 60
)
CRON_ARGS = ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"]

BODY = b"".join(
    b"line %03d of a message of about one kibibyte, as cron or a script would send\r\n" % i for i in range(12)
)
SENDER = "bench@example.org"
RECIPIENT = "sink@example.net"


def message(number: int) -> bytes:
    """A message of about 1 KiB as the spool stores it (CRLF line ends) and the sink receives it."""
    return (
        b"From: %s\r\nTo: %s\r\nSubject: bench %d\r\n\r\n" % (SENDER.encode(), RECIPIENT.encode(), number)
        + BODY
    )


# --- the spool, written straight in its on-disk format ---


def queue_id(now: float) -> str:
    """An id as `pymta.queue.directory.new_id` makes it: 8 hex digits of the time, 64 random bits."""
    return f"{int(now):08x}{os.urandom(8).hex()}"


def envelope_line(name: str, now: float) -> bytes:
    """The envelope line that `sendmail` (as root) writes before the message: `v` and `uid` first."""
    envelope = {
        "v": 1,
        "uid": os.getuid(),
        "id": name,
        "sender": SENDER,
        "recipients": [RECIPIENT],
        "submitted_by": "bench",
        "full_name": "",
        "queued_at": now,
        "notify": None,
        "ret": None,
        "envid": None,
        "body_type": None,
    }
    return json.dumps(envelope, separators=(",", ":")).encode() + b"\n"


def fill(spool: Path, count: int, deferred_until: float | None = None) -> None:
    """`count` messages: committed drops in new/, as sendmail leaves them; or, with `deferred_until`,
    picked-up messages in queue/ with a deferred state whose mtime (the next attempt) is that time, as a
    flush leaves them after a 4xx (the keys: `pymta.queue.entry`). Written without an fsync each, then
    os.sync()ed once: the flush meets a queue filled earlier, not the journal of the fill being written."""
    for sub in ("tmp", "new", "queue", "state", "corrupt"):
        (spool / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    now = time.time()
    state = {
        "state": "deferred",
        "attempts": 1,
        "last_attempt": now,
        "next_attempt": deferred_until,
        "last_error": "451 4.3.0 bench: try again later",
        "relay": "127.0.0.1",
        "warned": False,
        "recipients": {RECIPIENT: {"status": "deferred", "last_error": "451 4.3.0 bench: try again later"}},
    }
    state_data = json.dumps(state, separators=(",", ":")).encode()
    where = spool / ("new" if deferred_until is None else "queue")
    for number in range(count):
        name = queue_id(now)
        (where / name).write_bytes(envelope_line(name, now) + message(number))
        if deferred_until is not None:
            path = spool / "state" / name
            path.write_bytes(state_data)
            os.utime(path, (deferred_until, deferred_until))
    os.sync()


def queued(spool: Path) -> int:
    return sum(len(os.listdir(spool / sub)) for sub in ("new", "queue") if (spool / sub).is_dir())


# --- running things ---


# The peak RSS of a child comes from GNU time, which forks it from its own small process: the kernel's
# ru_maxrss of a child this process started would count this process's own peak (the memory a vfork
# child shares until it execs).
TIME = "/usr/bin/time"
RSS_FILE = Path(tempfile.gettempdir(), f"pymta-bench-rss-{os.getpid()}")


@dataclass
class Run:
    seconds: float
    rss_mib: float | None  # peak resident set of the process, when asked for
    first_output: float | None = None  # seconds until the first byte on stdout, when it was read
    output_lines: int = 0


def run(
    argv: list[str],
    env: dict[str, str],
    stdin: bytes = b"",
    capture: bool = False,
    rss: bool = True,
    cpus: set[int] | None = None,
) -> Run:
    """Run `argv` to its end: its wall time, and its peak RSS (`rss`: through GNU time, which adds
    a millisecond; the start-up figures are timed without it), on `cpus` when given. Fails loudly on a
    non-zero exit."""
    if rss:
        argv = [TIME, "-f", "%M", "-o", str(RSS_FILE), *argv]
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        env=env,
        preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
    )
    feeder = None
    if stdin:
        assert proc.stdin is not None
        if len(stdin) <= 32768:  # fits in the pipe: no thread in the timing of a small enqueue
            _feed(proc.stdin, stdin)
        else:
            feeder = threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True)
            feeder.start()
    result = Run(0.0, None)
    if capture:
        assert proc.stdout is not None
        while chunk := os.read(proc.stdout.fileno(), 1 << 16):
            if result.first_output is None:
                result.first_output = time.perf_counter() - start
            result.output_lines += chunk.count(b"\n")
        proc.stdout.close()
    code = proc.wait()
    result.seconds = time.perf_counter() - start
    if feeder is not None:
        feeder.join()
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {code}")
    if rss:
        result.rss_mib = int(RSS_FILE.read_text().split()[-1]) / 1024
    return result


def placement(pinned: bool) -> tuple[set[int] | None, set[int] | None]:
    """The CPUs of the sink and of its clients (the smtplib loop, `pymta flush`): the last CPU for the sink,
    the others for the clients, so that each round trip crosses from one CPU to another as it would cross
    the network to a smarthost. Left to the scheduler (None, None) when not `pinned` or with one CPU: it
    may then put a client and the sink on one CPU, where a lockstep round trip costs almost nothing and
    the loop runs at twice to three times its pinned rate."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pinned or len(cpus) < 2:
        return None, None
    return {cpus[-1]}, set(cpus[:-1])


def _feed(pipe: object, data: bytes) -> None:
    try:
        pipe.write(data)  # type: ignore[attr-defined]
        pipe.close()  # type: ignore[attr-defined]
    except BrokenPipeError:
        pass


def smtplib_loop(port: int, count: int) -> float:
    """Seconds for smtplib to send `count` messages over one connection: Python's ceiling for a client."""
    messages = [message(number) for number in range(count)]
    start = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("bench.example.org")
        for data in messages:
            client.sendmail(SENDER, [RECIPIENT], data)
    return time.perf_counter() - start


@dataclass
class Figure:
    """Samples of one quantity; `median (lowest-highest)` in the table."""

    unit: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def show(self, digits: int = 1, scale: float = 1.0) -> str:
        low, mid, high = (
            f"{v * scale:,.{digits}f}" for v in (min(self.samples), self.median, max(self.samples))
        )
        unit = self.unit if self.unit in ("/s", "x") else f" {self.unit}"
        return f"{mid}{unit} ({low}-{high})" if len(self.samples) > 1 else f"{mid}{unit}"


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.python = args.python
        self.venv = Path(args.venv) if args.venv else tmp / "venv"
        self.bin = self.venv / "bin"
        self.launchers = tmp / "launchers"
        self.figures: dict[str, Figure] = {}
        self.notes: list[str] = []
        self.imports: list[tuple[str, float, float]] = []
        self.spent: dict[str, float] = {}  # seconds each part of the run took
        self.sink_cpus, self.client_cpus = placement(not args.unpinned)
        if self.sink_cpus is None:
            self.notes.append("the sink and the flush clients ran wherever the scheduler put them")
        else:
            self.notes.append(
                f"the sink ran on CPU {min(self.sink_cpus)}, the smtplib loop and `pymta flush` on CPU "
                f"{', '.join(map(str, sorted(self.client_cpus or ())))}"
            )
        self.version = subprocess.run(
            [self.python, "-c", "import platform; print(platform.python_version())"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    def _pin_client(self) -> None:
        if self.client_cpus is not None:
            os.sched_setaffinity(0, self.client_cpus)

    def figure(self, name: str, unit: str) -> Figure:
        return self.figures.setdefault(name, Figure(unit))

    # -- set-up --

    def install(self) -> None:
        """The README's install, into the venv (made when missing), unless --no-install reuses it as it is."""
        if not (self.args.no_install and (self.bin / "pymta").exists()):
            if not (self.bin / "python3").exists():
                subprocess.run([self.python, "-m", "venv", str(self.venv)], check=True)
            # The scripts are written by the pip that runs this command, before it has upgraded itself: in a
            # fresh venv that is the interpreter's bundled pip, as for a user following the README.
            pip = subprocess.run([str(self.bin / "pip"), "--version"], capture_output=True, text=True)
            self.notes.append(f"the console scripts were written by {' '.join(pip.stdout.split()[:2])}")
            subprocess.run(
                [str(self.bin / "pip"), "install", "-q", "-U", "pip", "."],
                cwd=SOURCE,
                check=True,
                stdout=subprocess.DEVNULL,
            )
        script = (self.bin / "sendmail").read_text(errors="replace")
        if "import re" in script:
            self.notes.append("pip's sendmail script imports re")
        pth = sorted(p.name for p in self.venv.glob("lib/python*/site-packages/*.pth"))
        if pth:
            self.notes.append(f"the venv's site runs {', '.join(pth)}")
        self.launchers.mkdir(mode=0o755)
        code = (
            "import sys\nfrom pymta.setup.launcher import ENTRY_POINTS, this_install, write_launchers\n"
            "write_launchers(sys.argv[1], this_install(), tuple(ENTRY_POINTS))\n"
        )
        # -I: the install's pymta, not one in the working directory (the launchers would name its path)
        subprocess.run([str(self.bin / "python3"), "-I", "-c", code, str(self.launchers)], check=True)

    def configs(self, port: int) -> None:
        """Two spools: one that the enqueue figures fill, one that each flush empties."""
        home = self.tmp / "home"
        home.mkdir()
        (self.tmp / "mail").mkdir()
        sandbox = (
            f"local:\n  mailbox: mbox\n  mail_spool: {self.tmp}/mail\n  maildir: {self.tmp}/Maildir\n"
            f"aliases: {self.tmp}/aliases\nhostname: bench.example.org\ndeliver: queue\n"
        )
        self.enqueue_spool = self.tmp / "enqueue-spool"
        self.flush_spool = self.tmp / "flush-spool"
        (self.tmp / "enqueue.yaml").write_text(f"spool: {self.enqueue_spool}\n{sandbox}")
        (self.tmp / "flush.yaml").write_text(
            # Its log lines (one per message) go to a file, as an admin's would go to the journal: wherever
            # the bench's own stderr goes (a terminal: nowhere; a file: there) must not decide what is timed.
            f"spool: {self.flush_spool}\nlog: {self.tmp}/pymta.log\n{sandbox}"
            f"smarthosts:\n  - host: 127.0.0.1\n    port: {port}\n    security: none\n"
        )
        base = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
        self.enqueue_env = {**base, "PYMTA_CONFIG": str(self.tmp / "enqueue.yaml")}
        self.flush_env = {**base, "PYMTA_CONFIG": str(self.tmp / "flush.yaml")}
        self.port = port

    # -- the measurements --

    def startup(self) -> None:
        sendmail, launcher = str(self.bin / "sendmail"), str(self.launchers / "sendmail")
        cases = {
            "python3 -c pass": ([self.python, "-c", "pass"], b""),
            "python3 -S -c pass": ([self.python, "-S", "-c", "pass"], b""),
            "python3 -I -S -c pass": ([self.python, "-I", "-S", "-c", "pass"], b""),
            "sendmail enqueue (pip script)": ([sendmail, *CRON_ARGS], CRON_MESSAGE),
            "sendmail enqueue (launcher)": ([launcher, *CRON_ARGS], CRON_MESSAGE),
            "sendmail --version (pip script)": ([sendmail, "--version"], b""),
            "sendmail --version (launcher)": ([launcher, "--version"], b""),
        }
        for name, (argv, stdin) in cases.items():  # the page cache warm, the .pyc files written; RSS
            for _ in range(3):
                result = run(argv, self.enqueue_env, stdin)
                self.figure(f"{name}, peak RSS", "MiB").samples.append(result.rss_mib or 0.0)
        for _ in range(self.args.runs):
            for name, (argv, stdin) in cases.items():
                result = run(argv, self.enqueue_env, stdin, rss=False)
                self.figure(name, "ms").samples.append(result.seconds * 1000)

    def sequential(self) -> None:
        cases = {
            "sequential enqueues (pip script)": ([str(self.bin / "sendmail"), *CRON_ARGS], CRON_MESSAGE),
            "sequential enqueues (launcher)": ([str(self.launchers / "sendmail"), *CRON_ARGS], CRON_MESSAGE),
            "sequential python3 -c pass": ([self.python, "-c", "pass"], b""),
        }
        spent = dict.fromkeys(cases, 0.0)
        block = 100
        for done in range(0, self.args.messages, block):
            for name, (argv, stdin) in cases.items():
                for _ in range(min(block, self.args.messages - done)):
                    spent[name] += run(argv, self.enqueue_env, stdin, rss=False).seconds
        for name, seconds in spent.items():
            self.figure(name, "/s").samples.append(self.args.messages / seconds)

    def flush(self, count: int, rounds: int) -> None:
        """`rounds` rounds of: the smtplib loop, a queue of `count` filled, `pymta flush`, its start-up."""
        loop = [self.python, str(Path(__file__).resolve()), "--smtplib-loop", str(self.port), str(count)]
        for _ in range(rounds):
            done = subprocess.run(
                loop, check=True, capture_output=True, text=True, preexec_fn=self._pin_client
            )
            smtplib_rate = count / float(done.stdout)
            fill(self.flush_spool, count)
            result = run([str(self.bin / "pymta"), "flush"], self.flush_env, cpus=self.client_cpus)
            if queued(self.flush_spool):
                raise RuntimeError(f"pymta flush left {queued(self.flush_spool)} messages queued")
            self.figure(f"smtplib loop, {count:,}", "/s").samples.append(smtplib_rate)
            self.figure(f"pymta flush, {count:,}", "/s").samples.append(count / result.seconds)
            self.figure(f"pymta flush, {count:,}, ratio", "x").samples.append(
                count / result.seconds / smtplib_rate
            )
            self.figure(f"pymta flush, {count:,}, peak RSS", "MiB").samples.append(result.rss_mib or 0.0)
            start = run([str(self.bin / "pymta"), "--version"], self.flush_env, rss=False)
            self.figure("pymta --version", "ms").samples.append(start.seconds * 1000)
            # What the whole command pays before and after its messages: a flush of one message.
            fill(self.flush_spool, 1)
            one = run([str(self.bin / "pymta"), "flush"], self.flush_env, rss=False, cpus=self.client_cpus)
            self.figure("pymta flush, one message", "ms").samples.append(one.seconds * 1000)
            per_message = (result.seconds - one.seconds) / (count - 1) * 1e6
            self.figure(f"pymta flush, {count:,}, per further message", "us").samples.append(per_message)
            self.figure(f"smtplib loop, {count:,}, per message", "us").samples.append(1e6 / smtplib_rate)

    def large_message(self) -> None:
        line = b"a line of a large attachment, as base64 would send it: 76 characters wide....\n"
        data = b"Subject: 30 MB\n\n" + line * (30_000_000 // len(line))
        enqueue = run([str(self.bin / "sendmail"), "-i", RECIPIENT], self.flush_env, data)
        flush = run([str(self.bin / "pymta"), "flush"], self.flush_env)
        if queued(self.flush_spool):
            raise RuntimeError("the 30 MB message was not delivered")
        self.figure("30 MB enqueue, peak RSS", "MiB").samples.append(enqueue.rss_mib or 0.0)
        self.figure("30 MB enqueue", "s").samples.append(enqueue.seconds)
        self.figure("30 MB flush, peak RSS", "MiB").samples.append(flush.rss_mib or 0.0)
        self.figure("30 MB flush", "s").samples.append(flush.seconds)

    def big_queue(self) -> None:
        count = self.args.big_queue
        fill(self.flush_spool, count, deferred_until=time.time() + 7 * 86400)
        commands = {
            "idle flush": ([str(self.bin / "pymta"), "flush"], False),
            "pymta queue": ([str(self.bin / "pymta"), "queue"], True),
            "pymta queue --json": ([str(self.bin / "pymta"), "queue", "--json"], True),
            "mailq (launcher)": ([str(self.launchers / "mailq")], True),
        }
        for _ in range(3):
            for name, (argv, capture) in commands.items():
                result = run(argv, self.flush_env, capture=capture)
                label = f"{count:,} queued: {name}"
                self.figure(label, "s").samples.append(result.seconds)
                self.figure(f"{label}, peak RSS", "MiB").samples.append(result.rss_mib or 0.0)
                if result.first_output is not None:
                    self.figure(f"{label}, first output", "s").samples.append(result.first_output)
                    if result.output_lines < count:
                        raise RuntimeError(f"{name} listed {result.output_lines} lines of {count:,} messages")
        if queued(self.flush_spool) != count:
            raise RuntimeError("the idle flush changed the queue")
        due = time.time() - 60
        for name in os.listdir(self.flush_spool / "state"):
            os.utime(self.flush_spool / "state" / name, (due, due))
        result = run([str(self.bin / "pymta"), "flush"], self.flush_env)
        if queued(self.flush_spool):
            raise RuntimeError(f"the flush of {count:,} left {queued(self.flush_spool)} queued")
        self.figure(f"{count:,} queued: flush", "/s").samples.append(count / result.seconds)
        self.figure(f"{count:,} queued: flush, peak RSS", "MiB").samples.append(result.rss_mib or 0.0)

    def importtime(self) -> None:
        """What the launcher's sendmail imports beyond what `python3 -I -S -c pass` imports itself, by
        self time: the median of several runs of `-X importtime`."""
        python = [str(self.bin / "python3"), "-I", "-S", "-X", "importtime"]
        floor = set(_import_times(python + ["-c", "pass"], b"", self.enqueue_env))
        times: dict[str, list[tuple[float, float]]] = {}
        for _ in range(max(3, self.args.runs // 4)):
            argv = [*python, str(self.launchers / "sendmail"), *CRON_ARGS]
            for name, pair in _import_times(argv, CRON_MESSAGE, self.enqueue_env).items():
                if name not in floor:
                    times.setdefault(name, []).append(pair)
        self.imports = sorted(
            (
                (name, statistics.median(o for o, _ in pairs), statistics.median(c for _, c in pairs))
                for name, pairs in times.items()
            ),
            key=lambda item: -item[1],
        )

    # -- the report --

    def show(self, name: str, digits: int = 1, scale: float = 1.0) -> str:
        figure = self.figures.get(name)
        return figure.show(digits, scale) if figure else "not measured"

    def median(self, name: str) -> float | None:
        figure = self.figures.get(name)
        return figure.median if figure else None

    def table(self) -> list[tuple[str, str, str, str]]:
        rows: list[tuple[str, str, str, str]] = []
        floor = self.median("python3 -c pass")
        for how in ("pip script", "launcher"):
            enqueue = self.median(f"sendmail enqueue ({how})")
            if enqueue is None or floor is None:
                continue
            ratio = enqueue / floor
            rows.append(
                (
                    f"one `sendmail` enqueue, median ({how})",
                    f"{self.show(f'sendmail enqueue ({how})')} = {ratio:.2f}x `python3 -c pass` "
                    f"({self.show('python3 -c pass')})",
                    "<= 1.0x `python3 -c pass` of the same interpreter",
                    _met(ratio <= 1.0),
                )
            )
        floor_rate = self.median("sequential python3 -c pass")
        for how in ("pip script", "launcher"):
            rate = self.median(f"sequential enqueues ({how})")
            if rate is None or floor_rate is None:
                continue
            rows.append(
                (
                    f"{self.args.messages:,} sequential enqueues ({how})",
                    f"{rate:,.0f}/s = {rate / floor_rate:.2f}x the rate of `python3 -c pass` "
                    f"({floor_rate:,.0f}/s)",
                    ">= 0.9x of 1/`python3 -c pass`",
                    _met(rate / floor_rate >= 0.9),
                )
            )
        for count, target, bar in (
            (self.args.flush, ">= 1.0x the smtplib loop, whole command", 1.0),
            (self.args.big_flush, "clearly more than 1.0x (here: >= 1.1x)", 1.1),
        ):
            ratio = self.median(f"pymta flush, {count:,}, ratio")
            rows.append(
                (
                    f"`pymta flush`, {count:,} queued",
                    "not measured (--big)"
                    if ratio is None
                    else f"{self.show(f'pymta flush, {count:,}', 0)} = "
                    f"{self.show(f'pymta flush, {count:,}, ratio', 2)} the smtplib loop "
                    f"({self.show(f'smtplib loop, {count:,}', 0)})",
                    target,
                    "" if ratio is None else _met(ratio >= bar),
                )
            )
        big = self.args.big_queue
        flat = [self.median(f"{big:,} queued: flush, peak RSS"), self.median("30 MB flush, peak RSS")]
        rows.append(
            (
                "peak RSS enqueue / flush",
                f"{self.show('sendmail enqueue (pip script), peak RSS')} / "
                f"{self.show(f'pymta flush, {self.args.flush:,}, peak RSS')}",
                "flat in queue size and message size",
                "see below"
                if None in flat
                else _met(flat[0] is not None and flat[0] < 40 and flat[1] is not None and flat[1] < 60),
            )
        )
        for name, target, limit, key in (
            ("flush, peak RSS", "< 40 MiB", 40.0, f"{big:,} queued: flush, peak RSS"),
            ("idle flush (nothing due)", "< 1 s", 1.0, f"{big:,} queued: idle flush"),
            ("`pymta queue`", "< 3 s", 3.0, f"{big:,} queued: pymta queue"),
        ):
            value = self.median(key)
            if value is None:
                shown = "not measured (--big)"
            elif key.endswith("peak RSS"):  # the flush that delivers them all, and its rate
                shown = f"{self.show(key)} (delivering {self.show(f'{big:,} queued: flush', 0)})"
            else:
                shown = f"{self.show(key, 2)}, peak RSS {self.show(f'{key}, peak RSS')}"
            rows.append(
                (f"{big:,} queued: {name}", shown, target, "" if value is None else _met(value < limit))
            )
        key = f"{big:,} queued: pymta queue --json"
        first, rss = self.median(f"{key}, first output"), self.median(f"{key}, peak RSS")
        rows.append(
            (
                f"{big:,} queued: `pymta queue --json`",
                "not measured (--big)"
                if first is None
                else f"{self.show(key, 2)}, first output after {self.show(f'{key}, first output', 2)}, "
                f"peak RSS {self.show(f'{key}, peak RSS')}",
                "streams (here: first output < 1 s, peak RSS < 40 MiB)",
                "" if first is None or rss is None else _met(first < 1.0 and rss < 40),
            )
        )
        enqueue, flush = self.median("30 MB enqueue, peak RSS"), self.median("30 MB flush, peak RSS")
        rows.append(
            (
                "a 30 MB message: peak RSS enqueue / flush",
                f"{self.show('30 MB enqueue, peak RSS')} / {self.show('30 MB flush, peak RSS')}",
                "< 60 MiB",
                "" if enqueue is None or flush is None else _met(max(enqueue, flush) < 60),
            )
        )
        return rows

    def markdown(self) -> str:
        out = [
            f"{self.python} (Python {self.version}), {os.cpu_count()} cores, {platform.platform()}; "
            f"{self.args.runs} interleaved runs; median (lowest-highest)."
        ]
        out += [f"Note: {note}." for note in self.notes]
        out += ["", "| figure | pymta today | target | met? |", "|---|---|---|---|"]
        out += [f"| {' | '.join(row)} |" for row in self.table()]
        out += ["", "| start-up | wall time | peak RSS |", "|---|---|---|"]
        for name in (
            "python3 -c pass",
            "python3 -S -c pass",
            "python3 -I -S -c pass",
            "sendmail --version (pip script)",
            "sendmail --version (launcher)",
            "sendmail enqueue (pip script)",
            "sendmail enqueue (launcher)",
        ):
            out.append(f"| `{name}` | {self.show(name, 2)} | {self.show(f'{name}, peak RSS')} |")
        out.append(f"| `pymta --version` | {self.show('pymta --version')} | |")
        if self.median("pymta flush, one message") is not None:
            out.append(f"| `pymta flush` of one message | {self.show('pymta flush, one message')} | |")
        for count in (self.args.flush, self.args.big_flush):
            if self.median(f"pymta flush, {count:,}, per further message") is not None:
                out.append(
                    f"| each further message of {count:,}: `pymta flush` / the smtplib loop | "
                    f"{self.show(f'pymta flush, {count:,}, per further message', 0)} / "
                    f"{self.show(f'smtplib loop, {count:,}, per message', 0)} | |"
                )
        if self.imports:
            out += ["", "What sendmail imports through the launcher beyond `python3 -I -S -c pass`:", ""]
            out += ["| module | self (us) | cumulative (us) |", "|---|---|---|"]
            out += [f"| {name} | {own:,.0f} | {total:,.0f} |" for name, own, total in self.imports]
            out.append(f"| all {len(self.imports)} | {sum(own for _, own, _ in self.imports):,.0f} | |")
        return "\n".join(out)


def _import_times(argv: list[str], stdin: bytes, env: dict[str, str]) -> dict[str, tuple[float, float]]:
    """Each module that `argv` (run with -X importtime) imported: its self and cumulative time in us."""
    done = subprocess.run(argv, input=stdin, env=env, capture_output=True, check=True)
    found = {}
    for line in done.stderr.decode().splitlines():
        if line.startswith("import time:") and "|" in line and "self [us]" not in line:
            own, cumulative, name = line.removeprefix("import time:").split("|")
            found[name.strip()] = (float(own), float(cumulative))
    return found


def _met(ok: bool) -> str:
    return "yes" if ok else "no"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--python", default="/usr/bin/python3", help="the interpreter users have")
    parser.add_argument(
        "--venv",
        help="install into this venv (made when missing) and keep it; a venv whose pip is current already "
        "gets console scripts of that pip, not those of the bundled pip a fresh venv (the default) has",
    )
    parser.add_argument("--no-install", action="store_true", help="with --venv: use its install as it is")
    parser.add_argument("--runs", type=int, default=40, help="interleaved runs for the start-up medians")
    parser.add_argument("--messages", type=int, default=1000, help="sequential enqueues")
    parser.add_argument("--flush", type=int, default=1000, help="messages per flush round")
    parser.add_argument("--rounds", type=int, default=5, help="flush rounds")
    parser.add_argument("--big", action="store_true", help="also the large queues (about five minutes)")
    parser.add_argument("--only", help="only these parts, e.g. 'start-up,imports' (the install always runs)")
    parser.add_argument(
        "--unpinned",
        action="store_true",
        help="leave the sink and the flush clients to the scheduler instead of giving them CPUs of their own",
    )
    parser.add_argument("--big-flush", type=int, default=10000)
    parser.add_argument("--big-queue", type=int, default=100000)
    parser.add_argument(
        "--json", default=str(HERE / "results" / "compare.json"), help="where to write every figure"
    )
    parser.add_argument(
        "--smtplib-loop", nargs=2, type=int, metavar=("PORT", "COUNT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.smtplib_loop:  # the reference loop, in a process of its own
        print(smtplib_loop(*args.smtplib_loop))
        return 0

    if not os.access(TIME, os.X_OK):
        print(f"{TIME} is missing: it measures the peak RSS (apt install time)", file=sys.stderr)
        return 2
    started = time.time()
    sink_cpus, client_cpus = placement(not args.unpinned)
    sink = subprocess.Popen(
        [args.python, str(SINK)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=None if sink_cpus is None else lambda: os.sched_setaffinity(0, sink_cpus),
    )
    assert sink.stdout is not None and sink.stdin is not None
    try:
        with tempfile.TemporaryDirectory(prefix="pymta-bench-") as name:
            tmp = Path(name)
            bench = Bench(args, tmp)
            steps = {
                "install": bench.install,
                "start-up": bench.startup,
                "sequential enqueues": bench.sequential,
                "flush": lambda: bench.flush(args.flush, args.rounds),
                "30 MB": bench.large_message,
                "imports": bench.importtime,
            }
            if args.big:
                steps["big flush"] = lambda: bench.flush(args.big_flush, 3)
                steps["big queue"] = bench.big_queue
            only = set(args.only.split(",")) if args.only else set(steps)
            if only - set(steps):
                parser.error(
                    f"--only: no part {', '.join(sorted(only - set(steps)))}; parts: {', '.join(steps)}"
                )
            for part, step in steps.items():
                if part not in only and part != "install":
                    continue
                start = time.perf_counter()
                step()
                bench.spent[part] = round(time.perf_counter() - start, 1)
                if part == "install":
                    bench.configs(int(sink.stdout.readline()))
    finally:
        sink.stdin.close()
        sink.wait(30)
        RSS_FILE.unlink(missing_ok=True)
    report = bench.markdown()
    print(report)
    elapsed = time.time() - started
    parts = ", ".join(f"{name} {seconds:.0f}" for name, seconds in bench.spent.items())
    print(f"\n({elapsed:.0f} s: {parts}; every figure in {args.json})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "python": args.python,
                "python_version": bench.version,
                "cores": os.cpu_count(),
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "notes": bench.notes,
                "seconds": bench.spent,
                "table": [
                    dict(zip(("figure", "pymta today", "target", "met?"), row, strict=True))
                    for row in bench.table()
                ],
                "figures": {name: asdict(figure) for name, figure in bench.figures.items()},
                "imports": [{"module": m, "self_us": o, "cumulative_us": c} for m, o, c in bench.imports],
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
