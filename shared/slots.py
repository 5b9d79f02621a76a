"""Host slots on shared storage, for watchdog self-fencing (SBD-style; docs/watchdog.md).

``[storage] slot_dir`` holds, per host, two files with one writer each (so no
read-modify-write ever races):

* ``<host>.slot``: the host's agent's record, rewritten every ``slot_interval_s``
  while it is healthy: its boot, a counter that moves at each write, whether its
  watchdog is armed and the timeout the device reports. The fencer's watchdog
  level reads the counter (has the host stopped?) and the timeout (msgwait).
* ``<host>.pill``: the poison pill, written by the fencer (or nobody). Its
  presence is what counts: an agent that finds one, whatever is in it, powers its
  VMs off and stops feeding its watchdog, and after a reset starts nothing until
  ``hafence host clear`` removes it.

Writes go to a temporary file then ``os.replace`` (atomic on POSIX filesystems and
NFS), so a reader sees the old record or the new one, never half of one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec

from hafence.contracts import Count, Name
from hafence.subjects import Subjects, check_name

SLOT_SUFFIX = ".slot"
PILL_SUFFIX = ".pill"
# Larger files in a slot are not ours: refuse them rather than read them whole.
MAX_SLOT_BYTES = 4096


class SlotUnreachable(OSError):
    """The slot directory cannot be read or written: the storage is away."""


class SlotRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    host: Name
    boot_id: str
    counter: Count
    armed: bool
    # What the device reports (0 when not armed).
    timeout_s: float = 0.0
    # The agent's own limits (the fencer's msgwait covers them).
    interval_s: float = 0.0
    view_max_age_s: float = 0.0
    written_at: float = 0.0


class Pill(msgspec.Struct, frozen=True, kw_only=True):
    host: Name
    written_at: float
    by: str = ""
    reason: str = ""


_RECORD = msgspec.json.Decoder(SlotRecord)
_PILL = msgspec.json.Decoder(Pill)


def view_subject(subjects: Subjects, host: str) -> str:
    """Where the monitor's leader says it hears ``host`` (``<prefix>.view.<host>``)."""
    return f"{subjects.prefix}.view.{check_name('host', host)}"


def views_subject(subjects: Subjects) -> str:
    return f"{subjects.prefix}.view.*"


class Slots:
    def __init__(self, slot_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(slot_dir)

    def _path(self, host: str, suffix: str) -> Path:
        return self.dir / f"{check_name('host', host)}{suffix}"

    def check_dir(self) -> None:
        """The slot directory is there: a missing one (storage unmounted) is not 'no pill'."""
        try:
            if not self.dir.is_dir():
                raise SlotUnreachable(f"slot directory {self.dir} is not there")
            os.listdir(self.dir)
        except SlotUnreachable:
            raise
        except OSError as err:
            raise SlotUnreachable(f"slot directory {self.dir}: {err.strerror or err}") from None

    def _read(self, path: Path) -> bytes | None:
        try:
            with open(path, "rb") as f:
                return f.read(MAX_SLOT_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise SlotUnreachable(f"{path}: {err.strerror or err}") from None

    def _write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            raise SlotUnreachable(f"{path}: {err.strerror or err}") from None

    # --- the pill ------------------------------------------------------------

    def pill(self, host: str) -> Pill | None:
        """The pill in the host's slot, or None. Anything in the pill file counts as a
        pill (a torn or foreign write must stop the host, not be ignored); raises
        ``SlotUnreachable`` when the storage cannot tell."""
        self.check_dir()
        data = self._read(self._path(host, PILL_SUFFIX))
        if data is None:
            return None
        try:
            return _PILL.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return Pill(host=host, written_at=0.0, reason=f"unreadable pill ({len(data)} bytes)")

    def write_pill(self, host: str, by: str, reason: str) -> Pill:
        self.check_dir()
        pill = Pill(host=host, written_at=time.time(), by=by, reason=reason)
        self._write(self._path(host, PILL_SUFFIX), msgspec.json.encode(pill))
        return pill

    def clear_pill(self, host: str) -> bool:
        """Remove the host's pill; False if there was none."""
        self.check_dir()
        try:
            os.unlink(self._path(host, PILL_SUFFIX))
        except FileNotFoundError:
            return False
        except OSError as err:
            raise SlotUnreachable(f"{self._path(host, PILL_SUFFIX)}: {err.strerror or err}") from None
        return True

    # --- the agent's record ----------------------------------------------------

    def record(self, host: str) -> SlotRecord | None:
        """The host's record; None if it never wrote one or it is not a record of this host."""
        self.check_dir()
        data = self._read(self._path(host, SLOT_SUFFIX))
        if data is None or len(data) > MAX_SLOT_BYTES:
            return None
        try:
            record = _RECORD.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        return record if record.host == host else None

    def write_record(self, record: SlotRecord) -> None:
        self._write(self._path(record.host, SLOT_SUFFIX), msgspec.json.encode(record))
