"""Atomic checkpoints loadable with ``torch.load(weights_only=True)`` and RNG state capture."""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semivss.errors import DataError

CHECKPOINT_VERSION = 1


def fsync_dir(directory: Path) -> None:
    """fsync a folder (its entries: renames and new files), ignoring file systems that refuse it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _mode_for(path: Path) -> int:
    """Permissions of ``path`` when it exists, else 0666 minus the process umask."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def atomic_write(path: str | Path, write: Any, durable: bool = True) -> None:
    """Call ``write(file_object)`` on a temp file beside ``path``, fsync, then ``os.replace``.

    A failure at any point removes the temp file and leaves an existing ``path`` untouched.
    ``durable=False`` skips the fsyncs (per-frame outputs: still never half-written, but a power
    cut may lose the last ones).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _mode_for(path))  # mkstemp's 0600 -> the file's own or the umask's mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            exc.filename = str(path)  # name the file the user asked for (e.g. on a full disk)
        raise
    if durable:
        fsync_dir(path.parent)


def remove_stale_temps(folder: str | Path, name: str = "*") -> int:
    """Delete the temp files (``.<name>.<random>.tmp``) that :func:`atomic_write` calls killed
    before their rename left in ``folder``; returns how many."""
    n = 0
    for stale in Path(folder).glob(f".{name}.*.tmp"):
        stale.unlink(missing_ok=True)
        n += 1
    return n


def _refused_write(f: Any) -> OSError | None:
    """The OSError behind a RuntimeError of torch.save (its C++ zip writer drops the errno, and
    its cleanup may raise a second, unrelated-looking one): a file-size limit reached (EFBIG) or
    a full disk (ENOSPC); None when neither explains it."""
    import errno
    import resource

    try:
        size = os.fstat(f.fileno()).st_size
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and size >= limit - (1 << 16):
            return OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        st = os.fstatvfs(f.fileno())
        if st.f_bavail * st.f_frsize < (16 << 20):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except (OSError, ValueError):
        pass
    return None


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` with ``torch.save`` atomically (temp file, flush + fsync, ``os.replace``);
    a refused write is an OSError naming ``path``."""

    def write(f: Any) -> None:
        try:
            torch.save(state, f)
        except RuntimeError:
            refused = _refused_write(f)
            if refused is None:
                raise
            raise refused from None

    atomic_write(path, write)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on CPU with ``weights_only=True``; missing or corrupt -> DataError."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"checkpoint {path} is empty (0 bytes): a write was interrupted; use another checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        # torch's advice (weights_only=False) would run arbitrary code from the file: keep only
        # the first line of its reason
        if isinstance(exc, pickle.UnpicklingError):
            reason = "it holds Python objects that only unsafe (code-running) loading would rebuild; refused"
        else:
            reason = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise DataError(f"checkpoint {path} is corrupt or not a semivss checkpoint: {reason}") from None
    if not isinstance(state, dict):
        raise DataError(f"checkpoint {path} does not hold a dict (got {type(state).__name__})")
    return state


def capture_rng() -> dict[str, Any]:
    """RNG states of python ``random``, numpy's global RNG, torch CPU and CUDA (if initialised),
    as tensors / lists / ints only (``weights_only``-loadable)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                  int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(
        (str(kind), keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached))
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
