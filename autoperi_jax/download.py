"""Fetching one published file into a local cache: streamed, checksummed, all or nothing.

`fetch` downloads ``url`` to a temporary file beside ``dest`` while hashing it, and renames it
to ``dest`` only when the byte count and the SHA-256 are the ones expected. Whatever goes
wrong (the server is down, the transfer stops early, the bytes are not the published ones),
the temporary file is removed and `DownloadError` says which file was expected and from
where; a file already at ``dest`` is never touched by a failed fetch.

Only the standard library: `urllib.request` with a timeout, so a firewalled machine fails in
seconds rather than hanging.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

__all__ = ["DownloadError", "fetch", "sha256_file"]

CHUNK = 1 << 20


class DownloadError(OSError):
    """A download that did not produce the expected file."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(
    url: str,
    dest: str | os.PathLike,
    sha256: str,
    size: int | None = None,
    timeout: float = 30.0,
    progress: bool = True,
    desc: str | None = None,
) -> Path:
    """Downloads ``url`` to ``dest`` and verifies it; returns ``dest``.

    Args:
      url: where the file is published (``http(s)://`` or ``file://``).
      dest: final path; its folder is created.
      sha256: expected hex digest of the whole file.
      size: expected size in bytes (checked before the digest), if known.
      timeout: seconds to wait for the connection and for each read.
      progress: show a progress bar.
      desc: progress-bar label (default: the file name).

    Raises:
      DownloadError: no connection, an HTTP error, a short or long transfer, or a checksum
        mismatch. No partial file is left behind.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part{os.getpid()}")
    try:
        got, digest = _stream(url, tmp, size, timeout, progress, desc or dest.name)
        if size is not None and got != size:
            raise DownloadError(f"{url}: received {got:,} bytes, expected {size:,}")
        if digest != sha256:
            raise DownloadError(
                f"{url}: checksum mismatch (sha256 {digest}, expected {sha256}); the file "
                "at that address is not the published version"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _stream(
    url: str, tmp: Path, size: int | None, timeout: float, progress: bool, desc: str
) -> tuple[int, str]:
    """Copies the response body to ``tmp``; returns (bytes received, hex SHA-256)."""
    h = hashlib.sha256()
    got = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
            total = size or int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=f"downloading {desc}",
                disable=not progress,
            ) as bar:  # fmt: skip
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise DownloadError(f"{url}: cannot connect ({e.reason})") from e
    except (OSError, ValueError, http.client.HTTPException) as e:  # reset, IncompleteRead, timeout
        raise DownloadError(f"{url}: transfer failed after {got:,} bytes ({e})") from e
    return got, h.hexdigest()
