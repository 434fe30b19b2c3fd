"""The terminal (the driver; its Tally actor anywhere): quiet by default, the project's own bars and summaries.

`session(stage)` wraps one CLI command. Inside it, file descriptors 1 and 2 point at a log file,
so everything Ray and TensorFlow print (Python logging and warnings, C++ lines such as
`core_worker.cc` or `cuInit`, the lines Ray forwards from its workers) lands there; the
project's own output goes to duplicates of the original streams, `out()` and `err()`. The log
starts in the system temp dir; a stage moves it into its local output folder once that folder
is its own (`keep_log_in`), and its path is printed once. With `verbose` nothing is redirected.

Bars (`progress`, `remote_progress`) draw on `err()`, and only when it is a terminal: a job's log
or a test's pipe gets the summary alone. Outside a session `out()`/`err()` are sys.stdout/stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import os
import shutil
import socket
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass
from typing import IO, Any, Iterator

# A stage's log in its output folder is `_emotion_ray_log_<stage>.log` (outputs.LOG_PREFIX): Parquet
# readers skip names starting with "_", and an output's ownership rules never count it as content.
TEMP_FOLDER = "emotion_ray_logs"  # under tempfile.gettempdir(): logs of s3:// outputs and of predict


@dataclass
class Session:
    stage: str
    verbose: bool
    out: IO[str]
    err: IO[str]
    log_path: str | None = None
    log_shown: bool = False


_session: Session | None = None
_last_log: str | None = None


def out() -> IO[str]:
    """Where the project's own results go (the terminal's stdout while a session is quiet)."""
    return _session.out if _session else sys.stdout


def err() -> IO[str]:
    """Where the project's bars, notes and errors go (the terminal's stderr while quiet)."""
    return _session.err if _session else sys.stderr


def last_log() -> str | None:
    """The log file of the session that ended last (the CLI names it after an unexpected error)."""
    return _last_log


def _flush_all() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):  # C stdio buffers (printf from native code)
        ctypes.CDLL(None).fflush(None)


def _open_log(path: str) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def _log_line(path: str) -> str:
    return f"log: {path} (Ray and TensorFlow messages; --verbose shows them here)"


def _show_log() -> None:
    if _session and _session.log_path and not _session.log_shown:
        _session.log_shown = True
        print(_log_line(_session.log_path), file=_session.err, flush=True)


@contextlib.contextmanager
def session(stage: str, verbose: bool = False) -> Iterator[Session]:
    """Run one CLI command quietly (see the module doc); restores the streams on the way out.

    A Ray started inside is shut down before the streams come back, so its last lines stay in
    the log. An unexpected exception's traceback goes to the log too (the CLI prints it again)."""
    global _session
    try:  # fds 1 and 2 exist (not a daemon without them)
        os.fstat(1), os.fstat(2)
    except OSError:
        verbose = True
    if verbose:
        _session = Session(stage, True, sys.stdout, sys.stderr)
        try:
            yield _session
        finally:
            _session = None
        return

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(tempfile.gettempdir(), TEMP_FOLDER, f"{stage}-{stamp}-{os.getpid()}.log")
    log_fd = _open_log(path)
    os.write(log_fd, f"=== emotion-ray {stage} on {socket.gethostname()}, pid {os.getpid()}, "
                     f"{dt.datetime.now().astimezone().isoformat(timespec='seconds')}: {' '.join(sys.argv[1:])}\n"
                     .encode())
    _flush_all()
    saved = (os.dup(1), os.dup(2))  # not inheritable: Ray's processes never get the terminal
    term_out = os.fdopen(saved[0], "w", buffering=1, encoding=getattr(sys.stdout, "encoding", None) or "utf-8",
                         closefd=False)
    term_err = os.fdopen(saved[1], "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                         closefd=False)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    ray_before = _ray_initialized()
    _session = Session(stage, False, term_out, term_err, path)
    failure: BaseException | None = None
    try:
        yield _session
    except BaseException as exc:
        failure = exc
        traceback.print_exc()  # into the log
        raise
    finally:
        try:
            if _ray_initialized() and not ray_before:
                import ray

                ray.shutdown()  # its exit messages go to the log, not after the summary
        finally:
            _flush_all()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            term_out.close()
            term_err.close()
            os.close(saved[0])
            os.close(saved[1])
            current = _session
            _session = None
            _finish_log(current, failure)


def _finish_log(current: Session, failure: BaseException | None) -> None:
    """Name the log once (if it holds more than its header), or drop an empty temp log."""
    from emotion_ray.errors import EmotionRayError

    global _last_log

    path = current.log_path
    with contextlib.suppress(OSError):
        with open(path, "rb") as fh:
            lines = sum(1 for _ in fh)
        if lines <= 1 and not current.log_shown and os.path.dirname(path).endswith(TEMP_FOLDER):
            os.remove(path)
            return
    _last_log = path
    # A bug: the CLI prints the traceback and names the log itself.
    cli_names_it = isinstance(failure, Exception) and not isinstance(failure, EmotionRayError)
    if not current.log_shown and not cli_names_it:
        print(_log_line(path), file=sys.stderr)


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray and getattr(ray, "is_initialized", lambda: False)())


def keep_log_in(folder: str) -> None:
    """Move the session's log into `folder` (a local output the stage owns now, created if
    missing) as `_emotion_ray_log_<stage>.log`, appended to across runs; then print its path.
    An `s3://` folder keeps the log in the temp dir. Only the first call moves it (a train
    run's log stays in its run directory when it prepares its data there)."""
    if _session is None or _session.verbose or _session.log_shown:
        return
    if "://" in folder:
        _show_log()
        return
    old = _session.log_path
    from emotion_ray.outputs import LOG_PREFIX

    new = os.path.join(folder, f"{LOG_PREFIX}_{_session.stage}.log")
    try:
        new_fd = _open_log(new)
    except OSError:
        _show_log()
        return
    _flush_all()
    with open(old, "rb") as src, os.fdopen(os.dup(new_fd), "ab") as dst:
        shutil.copyfileobj(src, dst)
        copied = src.tell()
        os.dup2(new_fd, 1)
        os.dup2(new_fd, 2)
        src.seek(copied)
        shutil.copyfileobj(src, dst)  # what another thread wrote in between
    os.close(new_fd)
    os.remove(old)
    _session.log_path = new
    _show_log()


def bars_draw() -> bool:
    """Whether a bar would draw: only on a terminal."""
    stream = err()
    return bool(getattr(stream, "isatty", lambda: False)())


def _terminal_columns() -> int:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.get_terminal_size(err().fileno()).columns
    return 0


def progress(disable: bool = False, **kwargs: Any):
    """A tqdm bar on the terminal's stderr; it draws only when that is a terminal. It follows the
    terminal's width; a terminal that reports none (0 columns: `script`, some CI and container
    ttys), where tqdm would draw nothing at all, gets an 80-column bar."""
    from tqdm import tqdm

    width = {"dynamic_ncols": True} if _terminal_columns() > 0 else {"ncols": 80}
    return tqdm(file=err(), disable=disable or not bars_draw(), **width, **kwargs)


class Tally:
    """Progress counted by Ray tasks and actors, read by the driver (a tiny actor:
    `remote_progress`). Workers call `add.remote(n)` or `set.remote(done, postfix)`."""

    def __init__(self) -> None:
        self.done, self.postfix = 0, {}

    def add(self, n: int) -> None:
        self.done += n

    def set(self, done: int, postfix: dict[str, Any] | None = None) -> None:
        self.done, self.postfix = done, dict(postfix or {})

    def read(self) -> tuple[int, dict[str, Any]]:
        return self.done, self.postfix


@contextlib.contextmanager
def remote_progress(total: int, desc: str, unit: str, poll_seconds: float = 0.5) -> Iterator[Any]:
    """A bar for work that runs in Ray tasks or workers: yields a Tally actor handle to pass to
    them (they report, the driver polls), or None when no bar would draw (no actor is started)."""
    if not bars_draw():
        yield None
        return
    import ray

    tally = ray.remote(num_cpus=0)(Tally).remote()
    bar = progress(total=total, desc=desc, unit=unit)
    stop = threading.Event()

    def show() -> None:
        with contextlib.suppress(Exception):  # the actor not up yet, or Ray shutting down
            done, postfix = ray.get(tally.read.remote(), timeout=5)
            if postfix:
                bar.set_postfix(postfix, refresh=False)
            bar.update(min(done, total) - bar.n)  # a retried task counts twice
            bar.refresh()  # the elapsed time moves on while the count waits
            if done >= total:
                bar.close()  # its time and rate are the work's, not what the stage does after

    def poll() -> None:
        while not stop.wait(poll_seconds) and not bar.disable:  # closed: all done
            show()

    thread = threading.Thread(target=poll, name="emotion_ray-progress", daemon=True)
    thread.start()
    try:
        yield tally
    finally:
        stop.set()
        thread.join()
        show()
        bar.close()
        with contextlib.suppress(Exception):
            ray.kill(tally)
