"""The two limits `sendmail` enforces, the message size and the messages queued per user, and how their values
are read. Both the YAML loader (`pymta.config.load`) and the YAML-free reader `sendmail` uses
(`pymta.config.paths`) take them from here, so there is one definition of each (ARCHITECTURE.md).

This module imports nothing: it is on `sendmail`'s start-up path, which avoids even `re` and `fractions`.
"""

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

# Bytes: a 25 MB attachment (the most providers take) grows 37% in base64; the smarthost has the last word.
DEFAULT_MAX_MESSAGE_SIZE = 35_000_000
# Messages one user may have in a system-mode queue: far more than cron and scripts ever leave waiting, far
# fewer than it takes a runaway loop to fill the disk the others share (a few GB at 35 MB each at most).
DEFAULT_MAX_QUEUED_PER_USER = 1000

SIZE_UNITS: "Mapping[str, int]" = {
    "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
}  # fmt: skip
# The units format_size writes, largest first; decimal before binary so 35000000 reads "35M".
_SIZE_DISPLAY: tuple[tuple[str, int], ...] = (
    ("G", 10**9), ("GiB", 2**30), ("M", 10**6), ("MiB", 2**20), ("k", 10**3), ("KiB", 2**10),
)  # fmt: skip
_DIGITS = "0123456789"
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def parse_size(text: str) -> int:
    """Bytes in `text`: `35M`, `35MB`, `10k`, `1.5G`, `64KiB` or a plain number (k, M, G are powers of 1000).

    Units are case-insensitive and may follow one space; a fraction of a byte is dropped. Raises ValueError
    when `text` is not a size.
    """
    text = text.strip()
    end = len(text) - len(text.lstrip(_DIGITS))
    whole, fraction = text[:end], ""
    if whole and text[end : end + 1] == ".":
        rest = text[end + 1 :]
        fraction = rest[: len(rest) - len(rest.lstrip(_DIGITS))]
        end += 1 + len(fraction)
        if not fraction:
            whole = ""  # "5." is no number
    unit = text[end + 1 :] if text[end : end + 1] == " " else text[end:]
    # ASCII letters only, checked before lower(): the Kelvin sign lowers to "k".
    if not whole or not all(char in _LETTERS for char in unit) or (unit and unit.lower() not in SIZE_UNITS):
        raise ValueError(f"{text!r} is not a size")
    scale: int = 10 ** len(fraction)
    return int(whole + fraction) * SIZE_UNITS.get(unit.lower(), 1) // scale


def format_size(size: int) -> str:
    """`size` bytes in the largest unit that holds it exactly, e.g. `35M`; `parse_size` reads it back."""
    if size < 0:
        raise ValueError("a size cannot be negative")
    for unit, bytes_per_unit in _SIZE_DISPLAY:
        if size and size % bytes_per_unit == 0:
            return f"{size // bytes_per_unit}{unit}"
    return str(size)


def parse_queue_limit(text: str) -> int | None:
    """`max_queued_per_user` written as text: a whole number of at least 1, or `none` (None: no limit).

    Raises ValueError for anything else.
    """
    text = text.strip()
    if text == "none":
        return None
    if not text or text.lstrip(_DIGITS) or int(text) < 1:
        raise ValueError(f"{text!r} is not a number of messages")
    return int(text)
