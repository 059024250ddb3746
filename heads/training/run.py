"""Run folders: a new run never writes into another run's folder, and a lock keeps two processes out of one."""
from __future__ import annotations

import atexit
import contextlib
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

LOCK = ".lock"
RUN_FILES = ("config.yaml", "last.pt", "best.pt", "log.jsonl")  # any of them: the folder holds a run
STARTING_S = 10.0  # an empty lock younger than this belongs to a process still writing it


class RunError(RuntimeError):
    """A run folder that is in use, or holds nothing to resume."""


@dataclass
class Run:
    """A finished (or stopped) training run: its folder, final metrics and checkpoints."""

    folder: Path
    metrics: dict
    steps: int

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    @property
    def best(self) -> Path | None:
        """``best.pt``: the weights that scored best on the validation set (None before any evaluation)."""
        path = self.folder / "best.pt"
        return path if path.is_file() else None


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_FILES)


class RunLock:
    """``<folder>/.lock`` holding the owner's pid and host, created atomically; a lock whose process has died on
    this host is stale and taken over. Released on :meth:`release` or at interpreter exit."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.held = False

    def acquire(self) -> bool:
        for _ in range(2):  # a second try after removing a stale lock
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self.stale():
                    return False
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                continue
            with os.fdopen(descriptor, "w") as file:
                file.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.held = True
            atexit.register(self.release)
            return True
        return False

    def owner(self) -> str:
        try:
            return self.path.read_text().strip() or "a process that is starting"
        except OSError:
            return "another process"

    def stale(self) -> bool:
        try:
            text = self.path.read_text().split()
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return False
        if len(text) != 2 or not text[0].isdigit():
            return age > STARTING_S  # a writer that died before writing its pid
        pid, host = int(text[0]), text[1]
        if host != socket.gethostname():
            return False  # another machine's process: we cannot tell
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        if self.held:
            self.held = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def claim(output: Path) -> tuple[Path, RunLock]:
    """The folder for a new run: ``output`` if it holds no run and nobody holds it, else the first such of
    ``output-2``, ``output-3``, ...; returned locked."""
    for number in range(1, 10_000):
        folder = output if number == 1 else output.with_name(f"{output.name}-{number}")
        folder.mkdir(parents=True, exist_ok=True)
        lock = RunLock(folder)
        if lock.acquire():
            if not holds_run(folder):
                return folder, lock
            lock.release()
    raise RunError(f"no free run folder next to {output}")


def lock_for_resume(folder: Path) -> RunLock:
    """The lock of a run folder to continue, or an error naming the process that holds it."""
    lock = RunLock(folder)
    if not lock.acquire():
        raise RunError(f"{folder} is in use by {lock.owner()} (pid host); wait for it to finish or stop it, then "
                       f"resume (a lock left by a crash on this host is taken over automatically)")
    return lock
