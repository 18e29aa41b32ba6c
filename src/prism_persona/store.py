"""The run directory: one append-only JSONL file per stage, records keyed by content.

A stage asks its :class:`JsonlStore` whether a key is present before doing work, and appends each
record (flushed and fsynced) as soon as it is complete. A run killed at any moment (``kill -9``) loses
at most the record being written: on reopening, a torn last line is cut off with a warning, and the
stage redoes only the missing keys. Each store remembers the settings its records depend on
(``<stage>.meta.json``); reopening it with different settings is refused with a message that names
the changed keys, so old records are never silently mixed with new ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigMismatchError, PrismError
from .stages import store_stage

log = logging.getLogger(__name__)


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (the identity of a record)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


class JsonlStore:
    """Append-only JSONL file of dict records, each with a unique ``key`` field."""

    def __init__(self, path: str | Path, key_field: str = "key"):
        self.path = Path(path)
        self.key_field = key_field
        self._records: dict[str, dict] = {}
        self._order: list[str] = []
        if self.path.is_symlink():
            raise PrismError(
                f"{self.path} is a link (to {os.path.realpath(self.path)}); PRISM appends to its record files "
                "and never through a link: replace it with the file it points to"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        good_end = 0
        pos = 0
        lineno = 0
        while pos < len(raw):
            nl = raw.find(b"\n", pos)
            end = len(raw) if nl < 0 else nl + 1
            line = raw[pos:end]
            lineno += 1
            torn = nl < 0
            try:
                if line.strip():
                    rec = json.loads(line.decode("utf-8"))
                    if not isinstance(rec, dict) or self.key_field not in rec:
                        raise ValueError(f"record without '{self.key_field}'")
                    if torn:
                        raise ValueError("no newline at end (torn write)")
                    self._remember(rec)
            except (ValueError, UnicodeDecodeError) as exc:
                if torn:
                    log.warning("%s: dropping an incomplete last record (interrupted write)", self.path)
                    break
                raise PrismError(
                    f"{self.path}: line {lineno} is not a valid record ({exc}); "
                    f"fix or delete the file to redo this stage"
                ) from None
            good_end = end
            pos = end
        if good_end < len(raw):
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)

    def _remember(self, rec: dict) -> None:
        key = rec[self.key_field]
        if key in self._records:
            log.warning("%s: duplicate key %s ignored", self.path, key)
            return
        self._records[key] = rec
        self._order.append(key)

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[dict]:
        return (self._records[k] for k in self._order)

    def get(self, key: str, default: Any = None) -> Any:
        return self._records.get(key, default)

    def records(self) -> list[dict]:
        return list(self)

    def append(self, record: dict) -> None:
        self.extend([record])

    def extend(self, records: Iterable[dict]) -> None:
        new: list[dict] = []
        for rec in records:
            if self.key_field not in rec:
                raise ValueError(f"record has no '{self.key_field}' field")
            if rec[self.key_field] in self._records or any(r[self.key_field] == rec[self.key_field] for r in new):
                continue
            new.append(rec)
        if not new:
            return
        data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in new)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        for rec in new:
            self._remember(rec)


def _flatten(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, ensure_ascii=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def run_path(path: str | Path) -> Path:
    """A run directory's path; an empty one is refused (it would write the whole run into the current
    directory)."""
    if not str(path).strip():
        raise PrismError("the run directory is empty (--out '' / --run ''); name a directory, e.g. --out runs/demo")
    return Path(path).expanduser()


class RunDir:
    """A run directory you can point anywhere. Stages read and write only through it."""

    def __init__(self, path: str | Path):
        self.root = run_path(path)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".write-test-")  # O_EXCL: never through a link
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise PrismError(f"cannot write to output directory {self.root}: {exc.strerror or exc}") from None

    def path(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def read_json(self, name: str, default: Any = None) -> Any:
        p = self.root / name
        if not p.exists():
            return default
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise PrismError(f"{p} is not valid JSON ({exc})") from None

    def write_json(self, name: str, obj: Any) -> Path:
        write_json_atomic(self.root / name, obj)
        return self.root / name

    def store(self, stage: str, depends_on: dict | None = None) -> JsonlStore:
        """Open ``<stage>.jsonl``; refuse if it was made with different ``depends_on`` settings."""
        self.check_settings(stage, depends_on or {})
        return JsonlStore(self.root / f"{stage}.jsonl")

    def check_settings(self, stage: str, depends_on: dict) -> None:
        meta_name = f"{stage}.meta.json"
        old = self.read_json(meta_name)
        new = json.loads(json.dumps(depends_on, sort_keys=True, default=str))
        if old is not None and not (isinstance(old, dict) and isinstance(old.get("settings", {}), dict)):
            raise PrismError(
                f"{self.root / meta_name} is not a stage record (an object with 'settings'); "
                f"pass --redo {store_stage(stage)} to redo that stage"
            )
        if old is not None and old.get("settings") != new:
            a, b = _flatten(old.get("settings", {})), _flatten(new)
            changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:4])
            raise ConfigMismatchError(
                f"{self.root} holds '{stage}' records made with other settings ({shown}); "
                f"use a new --out, or pass --redo {store_stage(stage)} to redo that stage with them"
            )
        if old is None:
            self.write_json(meta_name, {"stage": stage, "settings": new})

    def done(self, stage: str) -> bool:
        return (self.root / f"{stage}.done.json").exists()

    def mark_done(self, stage: str, info: dict | None = None) -> None:
        self.write_json(f"{stage}.done.json", {"stage": stage, **(info or {})})


# --------------------------------------------------------------------------------------------------
# a run directory stays inside itself

STAGE_DIRS = ("gate", "distill", "prism", "check", ".prism-redo")
"""The folders of a run PRISM writes into (their whole tree is checked for links leaving the run)."""


RUN_FILE_SUFFIXES = (".json", ".jsonl", ".md", ".png", ".lock", ".safetensors", ".pt", ".txt", ".csv")


def run_file_name(name: str) -> bool:
    """Whether PRISM may write or delete an entry of this name at the top of a run (or check) directory:
    its stage folders, its own dot-files and every kind of file it writes. Other entries (a data folder
    you linked in) are never touched, so a link there is left alone."""
    return name in STAGE_DIRS or name.startswith(".prism") or name.lower().endswith(RUN_FILE_SUFFIXES)


def links_leaving(root: Path) -> list[Path]:
    """The symlinks in ``root`` (its entries, and the trees of :data:`STAGE_DIRS`) whose target is
    outside ``root``: a file the run writes or deletes is never reached through one of them."""
    root = root.resolve()
    out: list[Path] = []

    def leaves(p: Path) -> bool:
        try:
            target = p.resolve()
        except (OSError, RuntimeError):  # a loop of links: nowhere inside the run either
            return True
        return target != root and root not in target.parents

    try:
        entries = list(os.scandir(root))
    except OSError:
        return out
    for e in entries:
        p = Path(e.path)
        if e.is_symlink():
            if run_file_name(e.name) and leaves(p):
                out.append(p)
        elif e.name in STAGE_DIRS and e.is_dir(follow_symlinks=False):
            for dirpath, dirnames, filenames in os.walk(p):  # does not follow links
                for name in dirnames + filenames:
                    q = Path(dirpath) / name
                    if q.is_symlink() and leaves(q):
                        out.append(q)
    return out


def check_inside(root: Path) -> None:
    """One line naming the first link in the run directory ``root`` that leaves it (a received tarball
    keeps symlinks: PRISM would write, append or delete outside the run through them)."""
    bad = links_leaving(root)
    if bad:
        raise PrismError(
            f"{bad[0]} is a link to {os.path.realpath(bad[0])}, outside the run directory {root.resolve()}; "
            "a run writes only inside itself: replace the link with the file it points to, or remove it"
        )


# --------------------------------------------------------------------------------------------------
# one writer per run directory

LOCK_NAME = ".prism.lock"
_HELD: dict[str, list] = {}  # resolved run dir -> [open lock file, depth]: re-entrant within a process


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID is running (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _lock_holder(path: Path) -> int:
    try:
        return int(path.read_text(encoding="utf-8").split()[0])
    except (OSError, ValueError, IndexError):
        return 0


class RunLock:
    """``with RunLock(run_dir):`` - this process is the only PRISM process writing ``run_dir``.

    The lock is ``RUN/.prism.lock`` holding the PID of its holder (emptied on release). Where the OS has ``flock`` the file
    is also locked by the kernel, which releases it when the holder dies however it dies (``kill -9``
    included), so a stale lock is taken over and a recycled PID can never keep a run locked; elsewhere a
    lock whose PID is no longer alive is taken over. A second process gets a one-line
    :class:`PrismError` naming the PID that holds the run. Re-entrant within one process.
    """

    def __init__(self, run_dir: str | Path):
        self.root = run_path(run_dir).resolve()
        self.path = self.root / LOCK_NAME

    def __enter__(self) -> RunLock:
        key = str(self.root)
        if key in _HELD:
            _HELD[key][1] += 1
            return self
        check_inside(self.root)  # before the lock file itself is opened
        RunDir(self.root)  # creates it, or a one-line error for an unwritable path
        _HELD[key] = [self._acquire(), 1]
        return self

    def __exit__(self, *exc: Any) -> None:
        key = str(self.root)
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            fh = held[0]
            try:  # the file stays (unlinking it would let two later processes lock two different files)
                fh.seek(0)
                fh.truncate()
                fh.flush()
            except OSError:
                pass
            fh.close()  # releases the flock

    def _busy(self, pid: int) -> PrismError:
        return PrismError(
            f"{self.root} is in use by another prism process (PID {pid or 'unknown'}); "
            "wait for it to finish, or stop it, before running this command again"
        )

    def _acquire(self):
        try:
            fh = open(self.path, "a+", encoding="utf-8")
        except OSError as exc:  # a directory, or a file without write permission, in its place
            raise PrismError(
                f"cannot open the run lock {self.path} ({exc.strerror or exc}); remove it if no prism process "
                "is using this run"
            ) from None
        try:
            import fcntl
        except ImportError:  # no flock (Windows): trust the PID in the file
            fcntl = None  # type: ignore[assignment]
        if fcntl is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                raise self._busy(_lock_holder(self.path)) from None
        else:
            holder = _lock_holder(self.path)
            if holder and holder != os.getpid() and pid_alive(holder):
                fh.close()
                raise self._busy(holder)
        stale = _lock_holder(self.path)
        if stale and stale != os.getpid():
            log.info("%s: taking over the lock of PID %d, which is no longer running", self.root, stale)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        return fh


# --------------------------------------------------------------------------------------------------
# a destructive command is all or nothing

SWAP_DIR = ".prism-redo"
"""Where :class:`StageSwap` keeps the files a ``--redo`` replaces until the command succeeds."""


def remove_entry(path: Path) -> bool:
    """Remove a run entry: a file or a link (never what it points to), or a folder with its tree.
    Whether there was anything to remove."""
    import shutil

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    else:
        return False
    return True


class StageSwap:
    """``--redo`` without loss: the files it replaces are moved aside into ``RUN/.prism-redo/`` (and the
    files every command rewrites are copied there), the stage is redone beside them, and only when the
    command succeeds is the old copy dropped (:meth:`commit`). A command that fails calls
    :meth:`rollback`: what it wrote under those names is removed and the old files move back, so the run
    is byte-identical to what it was before the command started.

    ``manifest.json`` lists every name with whether it existed when set aside; it is written before
    anything moves, so a process killed at any moment leaves a state :meth:`begin` (called again by the
    next command on the run) or :meth:`rollback` completes. A pending swap (``Ctrl-C``, ``kill -9``) is
    carried on by the next command: it finishes the redo (commit) or, if it fails, restores the run as
    it was before the first one.
    """

    def __init__(self, run: RunDir):
        self.run = run
        self.dir = run.root / SWAP_DIR
        self.manifest_path = self.dir / "manifest.json"

    def pending(self) -> bool:
        return self.manifest_path.is_file()

    def _manifest(self) -> dict:
        try:
            m = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            names = m["names"]
            if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
                raise ValueError("names")
            return names
        except (OSError, ValueError, KeyError, TypeError):
            raise PrismError(
                f"{self.manifest_path} is not a record of an interrupted --redo; remove {self.dir} "
                "(it holds the files the redo replaced) and redo the stage"
            ) from None

    def _safe(self, name: str) -> None:
        if not name or name.startswith(("/", ".")) or ".." in Path(name).parts or "/" in name:
            raise PrismError(f"{self.manifest_path} names '{name}', which is not a file of the run")

    def begin(self, moved: Iterable[str], copied: Iterable[str] = ()) -> None:
        """Set aside ``moved`` (they disappear from the run) and copy ``copied`` (they stay)."""
        import shutil

        names = self._manifest() if self.pending() else {}
        moved = list(moved)
        for name in moved:
            names.setdefault(name, "moved" if (self.run.root / name).exists() else "absent")
        for name in copied:
            names.setdefault(name, "copied" if (self.run.root / name).exists() else "absent")
        for name in names:
            self._safe(name)
        self.dir.mkdir(exist_ok=True)
        write_json_atomic(self.manifest_path, {"names": names})
        for name, how in names.items():
            src, kept = self.run.root / name, self.dir / name
            if how == "absent" or kept.exists() or kept.is_symlink():
                continue  # set aside by an earlier (interrupted) command, or nothing to keep
            if not (src.exists() or src.is_symlink()):
                continue
            if how == "moved":
                os.replace(src, kept)
            elif src.is_dir() and not src.is_symlink():
                shutil.copytree(src, kept, symlinks=True)
            else:
                shutil.copy2(src, kept, follow_symlinks=False)
        for name in moved:  # asked to go again (a second --redo over a pending one): what the first wrote goes too
            if names[name] != "copied":
                remove_entry(self.run.root / name)

    def commit(self) -> None:
        """The command succeeded: drop the old files."""
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    def rollback(self) -> None:
        """The command failed: remove what it wrote under the swapped names, move the old files back."""
        import shutil

        if not self.pending():
            return
        for name, how in self._manifest().items():
            self._safe(name)
            cur, kept = self.run.root / name, self.dir / name
            has_kept = kept.exists() or kept.is_symlink()
            if how != "absent" and not has_kept:
                continue  # never set aside (the command stopped before): the run's copy is the old one
            remove_entry(cur)
            if has_kept:
                os.replace(kept, cur)
        shutil.rmtree(self.dir, ignore_errors=True)
