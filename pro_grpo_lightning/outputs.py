"""What the package writes for the user: output folders that never silently replace anything.

- ``check_output_folder``: before any weights load, an output folder must be writable and, unless
  ``overwrite``, empty or absent (one line naming the folder otherwise).
- ``staged_folder``: write a whole output into a hidden sibling folder and move it into place only
  once it is complete, so a failure (a full disk, a crash) leaves the previous output untouched
  and no half-written one.
- ``write_digests`` / ``check_digests``: the ``SHA256SUMS`` file beside every export's weights,
  checked before ``predict`` loads them.
- ``publish_permissions``: what is written for others to read gets the modes the umask gives new
  files (temp-file writers create 0600).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from .errors import ConfigError, OutputError


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_output_folder(path: str, overwrite: bool = False, what: str = "out") -> None:
    """Refuse (``ConfigError``, one line naming ``what`` and the folder) an output folder that is a
    file, that holds anything (unless ``overwrite``), or whose nearest existing parent cannot be
    written; a cheap check to run before any weights load."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{what}={path!r}: is a file, not a folder")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ConfigError(f"{what}={path!r}: not empty ({len(os.listdir(path))} entries); choose another "
                          f"folder, or pass overwrite to replace it (only once the new output is complete)")
    parent = _existing_ancestor(os.path.dirname(path) if not os.path.isdir(path) else path)
    if not os.path.isdir(parent):
        raise ConfigError(f"{what}={path!r}: cannot create it, {parent!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}={path!r}: cannot write there ({parent!r} is not writable)")


#: what a failed write in a run leaves: checkpoints are replaced only by complete files
RUN_KEPT = "the checkpoints already written are intact (a save replaces a file only with a complete one)"


def output_error(err: OSError, path: str, kept: str) -> OutputError:
    """One line for an ``OSError`` while writing ``path``: what failed and what was ``kept``."""
    reason = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
              errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}.get(
                  err.errno, err.strerror or type(err).__name__)
    return OutputError(f"cannot write {path!r}: {reason}; {kept}")


@contextlib.contextmanager
def staged_folder(path: str, overwrite: bool = False, what: str = "out") -> Iterator[str]:
    """Yield a hidden temp folder beside ``path`` to write into; on success it becomes ``path``
    (an existing ``path``, only with ``overwrite``, is replaced after the new one is complete);
    on failure it is removed and ``path`` is as it was. ``OSError`` becomes ``OutputError``."""
    check_output_folder(path, overwrite, what)
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.pgl-tmp-")
    except OSError as err:
        raise output_error(err, path, "nothing was written") from err
    try:
        yield tmp
        publish_permissions(tmp)
        if os.path.isdir(path):  # overwrite: the old folder goes only once the new one is complete
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.pgl-old-")
            os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"{path!r} is as it was" if os.path.exists(path) else "nothing was written"
        raise output_error(err, path, kept) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


#: the file ``export`` writes beside its weights: ``sha256sum -c SHA256SUMS`` format
DIGEST_FILE = "SHA256SUMS"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_digests(folder: str) -> str:
    """Write ``<folder>/SHA256SUMS`` with the SHA-256 of every weights file under ``folder`` (the
    format ``sha256sum -c`` reads, so anyone can check an export without this package)."""
    lines = []
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.endswith(WEIGHT_SUFFIXES):
                path = os.path.join(root, name)
                lines.append(f"{_sha256(path)}  {os.path.relpath(path, folder)}")
    out = os.path.join(folder, DIGEST_FILE)
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return out


def check_digests(folder: str, what: str) -> None:
    """Refuse (``ConfigError`` naming ``what``, the folder and the file) an export whose weights no
    longer match its ``SHA256SUMS`` (a flipped bit, a damaged copy, a swapped file). A folder
    without one (not written by ``export``) is not checked."""
    listing = os.path.join(folder, DIGEST_FILE)
    if not os.path.isfile(listing):
        return
    with open(listing, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            digest, _, name = line.rstrip("\n").partition("  ")
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise ConfigError(f"{what}={folder!r}: {name} is listed in {DIGEST_FILE} but missing")
            if _sha256(path) != digest:
                raise ConfigError(f"{what}={folder!r}: corrupted: {name} does not match its SHA-256 in "
                                 f"{DIGEST_FILE} (a flipped bit, a damaged copy or a replaced file); "
                                 f"export the checkpoint again")


def publish_permissions(path: str) -> None:
    """Give ``path`` (a file, or a folder and everything under it) the modes the user's umask gives
    new files (usually 0644 / 0755): temp-file writers create 0600, which hides a shared run's
    checkpoints and exports from the user's colleagues."""
    mask = os.umask(0)
    os.umask(mask)
    paths = [path] if os.path.isfile(path) else [path, *(os.path.join(r, n) for r, ds, fs in os.walk(path)
                                                        for n in [*ds, *fs])]
    for p in paths:
        os.chmod(p, (0o777 if os.path.isdir(p) else 0o666) & ~mask)
