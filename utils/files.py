"""Writing files safely: atomic writes (temporary file + rename), one-line write errors, free space."""
from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from utils.errors import UserError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class WriteError(UserError, RuntimeError):
    """A file could not be written. Also a RuntimeError: callers that caught torch.save's own errors still do."""


def human_size(n: float) -> str:
    units, i = ("B", "KiB", "MiB", "GiB", "TiB"), 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def free_space(folder: str | Path) -> int | None:
    """Free bytes on `folder`'s filesystem (or its nearest existing parent's); None where it cannot be read."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _reason(error: BaseException) -> tuple[str, bool]:
    """(the first line of the cause, whether the disk is full). A full disk is looked for anywhere in the
    chain: torch.save reports ENOSPC as a RuntimeError from its zip writer, with the OSError only as context."""
    seen, e = set(), error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return os.strerror(e.errno), True
        e = e.__cause__ or e.__context__
    if isinstance(error, OSError) and error.strerror:
        return error.strerror, False
    text = str(error).strip().splitlines()
    return (f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__), False


def write_error(path: str | Path, error: BaseException, what: str = "") -> WriteError:
    """One line: the file, why, the free space left on its filesystem and what to do."""
    path = Path(path)
    reason, full = _reason(error)
    free = free_space(path.parent)
    left = f"{human_size(free)} free on its filesystem" if free is not None else "free space unknown"
    todo = "Free some space or choose another folder" if full or (free is not None and free < 2**30) else \
        "Check that folder (permissions, mount) or choose another"
    return WriteError(f"could not write {path}{f' ({what})' if what else ''}: {reason}; {left}. {todo}, then run "
                      "again; earlier files are intact")


@contextmanager
def write_guard(path: str | Path, what: str = ""):
    """Any failure inside becomes write_error(path): whatever the writer raises, the user gets one line."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        raise write_error(path, e, what) from e


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to `path` atomically."""
    import torch  # here: the ground layer is imported by torch-free paths (predict_onnx, option checks)

    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_savefig(fig, path: str | Path) -> None:
    """A matplotlib figure as PNG, rendered in memory and written atomically: a full disk leaves the previous
    plot, not half a PNG. Closes the figure."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(buffer.getvalue(), path)


def new_file_mode() -> int:
    """The mode a new file gets here (0666 less the umask), for files that other writers create 0600
    (safetensors' save_file, mkstemp)."""
    try:  # Linux names the umask without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it, and set it back at once
    os.umask(mask)
    return 0o666 & ~mask


def temporary_beside(path: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    """(fd, path) of a new empty file `.<name>.<8 hex><suffix>` beside `path`, with the mode a new `path` would get.

    Not mkstemp: its files are 0600 and the rename keeps that, so weights, results and indexes came out readable
    by their owner only (a team folder, a web server under another user, a copy to a shared disk could not read
    them). Created 0666 and left to the umask, as any new file; a file being replaced keeps its own mode."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        try:
            if hasattr(os, "fchmod") and path.exists():
                os.fchmod(fd, stat.S_IMODE(path.stat().st_mode))
        except OSError:
            pass  # the mode of a file about to be replaced is a courtesy, not worth failing the write for
        return fd, tmp
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {path}")


def _atomic_write(path: str | Path, write) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: a crash leaves the old file or the new one."""
    path = Path(path)
    with write_guard(path):
        fd, tmp = temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)  # first: the message then shows the space that is really left
        if isinstance(e, Exception) and not isinstance(e, UserError):
            raise write_error(path, e) from e
        raise


def append_text(path: str | Path, text: str) -> None:
    """Append to a log file; a failed append is cut back off, so no half line is left for a reader to trip on."""
    path = Path(path)
    with write_guard(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        size = os.fstat(fd).st_size
        try:
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.write(text)
        except BaseException:
            try:
                os.truncate(path, size)
            except OSError:
                pass  # the write's own error is the one to report
            raise


def check_writable(folder: Path, setting: str = "save_dir") -> None:
    """Fail before the work, not at the first save hours later; `setting` names the variable to change."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{setting} {folder} is not writable ({e.strerror or e}); choose another {setting}") from e


def output_name(model_path: str, dataset: str) -> str:
    """`<run folder>_<weights>_<dataset>` for a result's default file name: two runs' last_epoch_weights.pth
    (logs/demo_en/, logs/my_run/) get two names. `dataset` is a name, used whole: a folder such as `cifar.a`
    keeps its dot (a caller with a file passes its stem). Characters a file name should not hold become "_"."""
    weights = Path(model_path) if model_path else None
    parts = [weights.parent.name, weights.stem] if weights else ["random"]
    text = "_".join(p for p in [*parts, dataset] if p and p != ".")
    return re.sub(r"[^\w.-]+", "_", text)


def refuse_existing(paths, overwrite: bool, elsewhere: str) -> None:
    """Nothing a user has is replaced unasked: a UserError naming the first of `paths` that exists, unless
    `overwrite`. `elsewhere` says what else to choose ("another output")."""
    existing = [Path(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UserError(f"{existing[0]} already exists{more}; choose {elsewhere}, or pass --overwrite true to "
                        "replace it")
