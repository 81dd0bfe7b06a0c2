"""Privilege separation: which process of a system-mode flush runs as which user, and why.

The privilege model (system mode, as `pymta setup` makes it; pymta(1), "PRIVILEGES", says the same):

    sendmail                the submitting user; writes a drop file into new/ (1733). No setuid, no setgid.
    pymta flush, as root    (the systemd unit or the cron line) forks the *delivery process* and then only
                            waits on it, serving its requests for local delivery. It never reads a queue
                            file, a credential or the network.
    the delivery process    the spool's owner (`pymta`), for good (setgroups, setgid, setuid): pick-up,
                            routing, the credentials, every SMTP session, bounces and queue state. A flaw in
                            the code that parses what a server or a user sent reaches only what `pymta` can.
    local delivery          for each local recipient the delivery process sends (user, sender, message) to the
                            root process, which forks a child that drops to that recipient and writes the
                            mailbox (`local.deliver_as_recipient`). Root opens no mailbox itself.
    pymta queue, mailq,     drop to the spool's owner for good before they touch the spool, so every file in
    pymta test, as root     it stays the owner's and what the owner planted there (a link, a FIFO) is met
                            with the owner's rights.

The rule under all of it (ARCHITECTURE.md invariant 10): root never creates, opens, renames or changes
anything inside the spool by path. It becomes the spool's owner first, or (the users' views, `views.publish`;
a submission, `Spool.submit`) works through `openat()` from a directory descriptor it opened without following
a link and checked. Nothing the owner could swap decides who root acts as: that is the owner of the spool
directory itself, whose name lives in a directory of root's (`spool_owner`). So no file in the spool is ever
root's to "give back".

The two talk in length-framed frames with limits (`frames`). Root treats the delivery process as
untrusted: it checks every frame against its limits and every request field before it acts, answers a bad
request with a deferral (that message only), and gives every read of a begun frame, and the delivery
process's exit, a deadline. The only wait without one is for the next request, while the
delivery process (which holds the flush lock, and so the run) works; its end closes the channel.

Why fork without exec: the delivery process needs no interpreter of its own and inherits the loaded modules.
The modules it will need later are imported before the switch (`preload`), so a Python installed where
`pymta` cannot read (a virtualenv under /root) still works; an installed pymta needs none of that.

A spool whose private directory belongs to root (user mode as root, or tests) runs in one process, as before.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pwd
import socket
import stat
import time
from collections.abc import Callable

from pymta import privileges
from pymta.delivery import frames
from pymta.errors import EX_SOFTWARE, PermissionDeniedError, PymtaError
from pymta.log import one_line
from pymta.mail.text import Text
from pymta.queue import views
from pymta.queue.spool import Spool
from pymta.records import asdict, fields

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from pymta.config.model import Config, Local
    from pymta.delivery.flush import FlushReport, LocalDelivery
    from pymta.delivery.local import LocalOutcome
    from pymta.queue.selection import Selection

# What the delivery process (and a command that became the spool's owner) imports before the switch, so that
# it comes from memory (the module docstring says why): every module of these packages, found on disk, so
# the list cannot go stale ...
PRELOAD_PACKAGES = ("pymta.mail", "pymta.config", "pymta.queue", "pymta.delivery", "pymta.delivery.smtp")
# ... and the modules the standard library imports on first use, which no import statement of pymta shows
# (time.strptime, email's policies; email's parser, the IDNA codec and the `idna` package come with
# dnspython, imported by delivery/mx.py), and the tables and codec `idna` loads on first use (`mail.idn`
# uses it only for an international domain), and http.client, which `mtasts` imports only to fetch a
# policy, and logging.handlers and difflib, which `log` and `config.load` import only for a syslog
# target and a config's mistake, and fractions and decimal, which `config.model` imports only for a
# duration with a decimal point. tests/test_preload.py holds both: every import inside a function of
# those packages is loaded by then, and each name here is still needed.
PRELOAD_STDLIB = (
    "_strptime",
    "email.policy",
    "idna.uts46data",
    "encodings.punycode",
    "http.client",
    "logging.handlers",
    "difflib",
    "fractions",
    "decimal",
)


def preload() -> list[str]:
    """Import everything the delivery process may need later (`PRELOAD_PACKAGES`, `PRELOAD_STDLIB`); the
    names imported."""
    import pkgutil  # only a split flush preloads

    names = list(PRELOAD_STDLIB)
    for package in PRELOAD_PACKAGES:
        path = importlib.import_module(package).__path__
        names += sorted(info.name for info in pkgutil.iter_modules(path, f"{package}."))
    for name in names:
        importlib.import_module(name)
    return names


class DeliveryProcessError(PymtaError):
    """The delivery process stopped the run (its error) or died; the exit code is the one it gave."""

    def __init__(self, message: str, exit_code: int = EX_SOFTWARE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def spool_owner(spool: str) -> pwd.struct_passwd | None:
    """The user to drop to: the owner of the spool directory when we are root and it is someone else; else
    None (root's own spool: user mode as root, or tests).

    Judged by the spool directory itself, never by a name inside a directory the owner may change: it could
    swap queue/ for a link to a directory of root's, and a flush that trusted it would run all of its work
    as root. The spool's own name lives in a directory of root's (`pymta setup --check` says so when it
    does not). Only in a spool directory of root's (made by hand), where nobody else can swap a name, is
    the owner of queue/ (not followed) the one to become.
    """
    if os.geteuid() != 0:
        return None
    try:
        info = os.stat(spool)
        if info.st_uid == 0:
            info = os.lstat(os.path.join(spool, "queue"))
    except OSError:
        return None
    if info.st_uid == 0 or not stat.S_ISDIR(info.st_mode):
        return None
    try:
        return pwd.getpwuid(info.st_uid)
    except KeyError:
        raise DeliveryProcessError(
            f"the spool {spool} belongs to uid {info.st_uid}, which has no passwd entry; "
            "run 'pymta setup' to give it to the user pymta",
            78,
        ) from None


def become(owner: pwd.struct_passwd) -> None:
    """Switch this process to `owner` for good (`privileges.become`: groups, gid and uid, real, effective
    and saved), with their home; what it may import later is imported before (`preload`), while this
    Python's files are still readable."""
    preload()
    privileges.become(owner, privileges.groups_of(owner))
    os.environ.update(HOME=owner.pw_dir, USER=owner.pw_name, LOGNAME=owner.pw_name)


def become_spool_owner(spool: str) -> None:
    """For a command run as root on a system spool: go on as its owner, so all it writes is theirs and all
    it reads is read with their rights (a FIFO or a link the owner planted meets the owner's rights, not
    root's). Nothing in the spool is touched before. Root's own spool (user mode as root): nothing changes.
    """
    owner = spool_owner(spool)
    if owner is not None:
        become(owner)


def run_flush(
    config: Config,
    logger: logging.Logger,
    *,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    selection: Selection | None = None,
) -> FlushReport:
    """One flush, split by privilege when we are root on a system spool (see the module docstring)."""
    from pymta.delivery.flush import Flusher  # lazy: not for a queue command, which only becomes the owner

    owner = spool_owner(config.spool)
    if owner is None:
        if views.own_view_only(config.spool):
            owner_name = views.spool_owner_name(config.spool)
            raise PermissionDeniedError(
                f"only root and {owner_name} (the spool's owner) may deliver the queue {config.spool}"
                f"; the timer or cron line that 'pymta setup' installed does it"
            )
        return Flusher(config, logger).run(force=force, progress=progress, selection=selection)
    logger.debug(f"delivery runs as {owner.pw_name} (uid {owner.pw_uid}); local delivery as each recipient")
    parent_end, child_end = socket.socketpair()

    def delivery_process() -> int:  # pragma: no cover - runs in the delivery process; the tests check it
        parent_end.close()
        return _delivery_process(config, logger, owner, child_end, force, progress, selection)

    pid = privileges.fork_child(delivery_process, failed=EX_SOFTWARE)
    child_end.close()
    try:
        result = _serve(config, parent_end, logger)
    finally:
        status = _reap(pid, parent_end)
        _publish_views(config, logger)
    if result is None:
        raise DeliveryProcessError(
            f"the delivery process (as {owner.pw_name}) ended early: {privileges.exit_text(status)}"
        )
    return result


def _publish_views(config: Config, logger: logging.Logger) -> None:
    """Give each user the view of their own queued mail (`views`), when the queue changed since the last.

    On a large queue a publish reads every envelope, so a run that changed nothing (most timer runs) skips
    it: the views are stamped with the time their reading began, and new/, queue/ and state/ change their
    mtime whenever a message comes, goes or changes state (by a flush or by `pymta queue`).
    """
    status = os.path.join(config.spool, views.STATUS_DIR)
    try:
        published = os.stat(status, follow_symlinks=False).st_mtime_ns
        changed = max(
            os.stat(os.path.join(config.spool, sub), follow_symlinks=False).st_mtime_ns
            for sub in ("new", "queue", "state")
        )
    except OSError:
        published, changed = 0, 1
    if changed < published:
        return
    started = time.time_ns()
    views.publish(Spool(config.spool), config, logger)
    try:
        os.utime(status, ns=(started, started), follow_symlinks=False)
    except OSError:
        pass  # no status/ (publish said why): the next run tries again


# --- The delivery process ---


def _delivery_process(
    config: Config,
    logger: logging.Logger,
    owner: pwd.struct_passwd,
    channel: socket.socket,
    force: bool,
    progress: Callable[[int, int], None] | None,
    selection: Selection | None = None,
) -> int:  # pragma: no cover - runs in the delivery process
    from pymta.delivery.flush import Flusher  # lazy: see run_flush

    try:
        become(owner)
        agent = _LocalAgent(channel, frames.payload_limit(config))
        flusher = Flusher(config, logger, local_delivery=agent.deliver)
        report = flusher.run(force=force, progress=progress, selection=selection)
        frames.send(channel, {"op": "done", "report": asdict(report)})
        return 0
    except PymtaError as error:
        frames.send_quietly(
            channel, {"op": "error", "message": frames.fit(str(error)), "code": error.exit_code}
        )
        return error.exit_code
    except BaseException as error:
        logger.exception("the delivery process failed")
        message = frames.fit(f"the delivery process failed: {error!r}")
        frames.send_quietly(channel, {"op": "error", "message": message, "code": EX_SOFTWARE})
        return EX_SOFTWARE


class _LocalAgent:
    """`local.deliver_as_recipient`, done by the root process on the delivery process's behalf.

    A request root would refuse is not sent (its outcome is given here); once root fails to answer in
    time, the channel is out of step, so every later local delivery of the run is deferred at once."""

    def __init__(self, channel: socket.socket, max_payload: int) -> None:
        self.channel = channel
        self.max_payload = max_payload
        self.broken = ""  # why root no longer answers, once it did not

    def deliver(
        self, user: str, message: bytes | Text, *, sender: str, local: Local, now: float
    ) -> LocalOutcome:  # pragma: no cover - runs in the delivery process
        """Ask root to deliver the message to `user`; root uses its own `local` settings, not ours. The frame
        holds it whole (bounded by `max_payload`): root never reads the spool by path."""
        from pymta.delivery.local import LocalOutcome, child_time_limit  # lazy: only a split flush

        if self.broken:
            return LocalOutcome("deferred", self.broken)
        if isinstance(message, Text):
            message = message.whole()
        header: dict[str, object] = {"op": "deliver", "user": user, "sender": sender, "now": now}
        request = frames.delivery_request(header, len(message), self.max_payload)
        if isinstance(request, frames.Refusal):  # root would refuse it: no need to ask
            return LocalOutcome(request.status, request.reason)
        try:
            frames.send(self.channel, header, message)
            answer = frames.receive(self.channel, wait=child_time_limit() + frames.IO_TIMEOUT)
            if answer is None:
                raise ValueError("an answer over the limits")
            return LocalOutcome.from_json(answer[0].decode())
        except frames.EndOfStreamError:
            self.broken = "the root process stopped serving local deliveries; will try again"
        except (OSError, frames.FrameError) as error:
            self.broken = f"the root process did not answer a local delivery ({error}); will try again"
        except (ValueError, KeyError, TypeError):
            return LocalOutcome("deferred", "the root process gave no usable answer; will try again")
        return LocalOutcome("deferred", self.broken)


# --- The root process ---

# Seconds root waits for the delivery process to exit after its last frame, before it kills it.
EXIT_TIMEOUT = 30.0


def _serve(
    config: Config,
    channel: socket.socket,
    logger: logging.Logger,
    deliver: LocalDelivery | None = None,
) -> FlushReport | None:
    """Serve the delivery process's local deliveries until it reports the end of its run (None: it closed
    the channel first). `deliver` is `local.deliver_as_recipient` unless a test says otherwise.

    Every request is checked (`delivery_request`) before anything is done for it; one that fails is
    answered with its deferral or failure and logged, and the next one is served. The wait for a request
    has no deadline: the delivery process's work between two (SMTP sessions) has its own timeouts, and it
    is the run itself. Raises DeliveryProcessError when the delivery process reports an error or breaks the
    framing; the caller then closes the channel and ends the process (`_reap`)."""
    from pymta.delivery.local import deliver_as_recipient  # lazy: only a split flush

    deliver = deliver or deliver_as_recipient
    limit = frames.payload_limit(config)
    while True:
        try:
            received = frames.receive(channel, wait=None, max_payload=limit)
        except frames.EndOfStreamError:
            return None
        except (OSError, frames.FrameError) as error:
            raise DeliveryProcessError(f"the delivery process broke off its requests: {error}") from None
        message = b""
        if received is None:
            request: frames.DeliveryRequest | frames.Refusal = frames.Refusal(
                "deferred",
                f"root refused a request over its limits ({frames.MAX_HEADER} bytes of header,"
                f" {limit} of message)",
            )
        else:
            header = frames.decode(received[0])
            message = received[1]
            if isinstance(header, dict) and header.get("op") in ("done", "error") and not message:
                return _last_word(header)
            request = frames.delivery_request(header, len(message), limit)
        outcome = _deliver_one(config, deliver, request, message, logger)
        try:
            frames.send(channel, _answer(outcome))
        except (OSError, frames.FrameError) as error:
            raise DeliveryProcessError(f"the delivery process took no answer: {error}") from None


def _deliver_one(
    config: Config,
    deliver: LocalDelivery,
    request: frames.DeliveryRequest | frames.Refusal,
    message: bytes,
    logger: logging.Logger,
) -> LocalOutcome:
    from pymta.delivery.local import LocalOutcome  # lazy: only a split flush

    if isinstance(request, frames.Refusal):
        logger.warning(f"local delivery: {request.reason}")
        return LocalOutcome(request.status, request.reason)
    try:
        return deliver(request.user, message, sender=request.sender, local=config.local, now=request.now)
    except Exception as error:  # noqa: BLE001 - any failure defers that recipient; the run goes on
        return LocalOutcome("deferred", f"local delivery failed: {error}")


def _answer(outcome: LocalOutcome) -> dict[str, object]:
    """The answer frame's header: the outcome, its texts cut to fit."""
    answer: dict[str, object] = json.loads(outcome.to_json())
    answer.update(reason=frames.fit(outcome.reason), mailbox=frames.fit(outcome.mailbox))
    return answer


def _last_word(request: dict[str, Any]) -> FlushReport:
    """The report of a `done` frame; a DeliveryProcessError for an `error` frame or a malformed report."""
    from pymta.delivery.flush import FlushReport  # lazy: see run_flush

    if request.get("op") == "error":
        code = request.get("code")
        message = request.get("message")
        if not isinstance(message, str):
            message = "the delivery process failed and did not say why"
        if isinstance(code, bool) or not isinstance(code, int) or not 0 < code < 256:
            code = EX_SOFTWARE
        raise DeliveryProcessError(frames.fit(one_line(message)), code)
    report = request.get("report")
    kinds = {field.name: field.type for field in fields(FlushReport)}
    if (
        not isinstance(report, dict)
        or set(report) != set(kinds)
        or any(type(value).__name__ != kinds[name] for name, value in report.items())
    ):
        raise DeliveryProcessError("the delivery process ended its run with a malformed report")
    return FlushReport(**report)


def _reap(pid: int, channel: socket.socket) -> int:
    """Close the channel (a delivery process waiting for an answer sees its end), then wait for the
    process to exit, at most EXIT_TIMEOUT seconds before it is killed (at once when it is seen stopped:
    `privileges.reap`); its wait status."""
    try:
        channel.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    channel.close()
    return privileges.reap(pid, EXIT_TIMEOUT)
