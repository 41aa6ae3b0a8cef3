"""Datasets by reference: the download (served from 127.0.0.1) and the resolution order."""

from __future__ import annotations

import hashlib
import http.server
import lzma
import threading
from pathlib import Path

import pytest

from autoperi_jax import datasets
from autoperi_jax.datasets import DATASET_FILES, DatasetError, DatasetFile, resolve_dataset
from autoperi_jax.download import DownloadError, fetch, sha256_file

BODY = b"material_id,cif\n" + b"x" * 300_000  # several socket reads
DIGEST = hashlib.sha256(BODY).hexdigest()
# shared copies that are row-identical but not byte-identical to the published file
_REWRITTEN = {("mp_20", "val"), ("mp_20", "test")}


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.endswith("/truncated.csv"):  # promises the whole body, sends a third
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[: len(BODY) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        if self.path.endswith("/missing.csv"):
            self.send_error(404, "Not Found")
            return
        body = BODY if not self.path.endswith("/tampered.csv") else BODY[:-1] + b"y"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    """An HTTP server on 127.0.0.1 serving the files above; yields its base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _no_partial(folder: Path) -> None:
    assert [p.name for p in folder.iterdir()] == [], "a partial file was left behind"


def test_fetch_good_file(server, tmp_path):
    dest = fetch(f"{server}/d/good.csv", tmp_path / "c" / "good.csv", DIGEST, len(BODY),
                 progress=False)  # fmt: skip
    assert dest.read_bytes() == BODY
    assert sha256_file(dest) == DIGEST
    assert [p.name for p in dest.parent.iterdir()] == ["good.csv"]


@pytest.mark.parametrize(
    "path, match",
    [
        ("tampered.csv", "checksum mismatch"),
        ("truncated.csv", "transfer failed|received"),
        ("missing.csv", "HTTP 404"),
    ],
)
def test_fetch_failures_leave_nothing(server, tmp_path, path, match):
    with pytest.raises(DownloadError, match=match):
        fetch(f"{server}/d/{path}", tmp_path / path, DIGEST, len(BODY), progress=False)
    _no_partial(tmp_path)


def test_fetch_server_down_keeps_an_existing_file(tmp_path, free_port):
    dest = tmp_path / "good.csv"
    dest.write_bytes(b"kept")
    with pytest.raises(DownloadError, match="cannot connect"):
        fetch(f"http://127.0.0.1:{free_port}/good.csv", dest, DIGEST, timeout=5, progress=False)
    assert dest.read_bytes() == b"kept"
    assert [p.name for p in tmp_path.iterdir()] == ["good.csv"]


def test_fetch_size_checked_before_digest(server, tmp_path):
    with pytest.raises(DownloadError, match=r"received 300,016 bytes, expected 5"):
        fetch(f"{server}/d/good.csv", tmp_path / "g.csv", DIGEST, size=5, progress=False)
    _no_partial(tmp_path)


# --------------------------------------------------------------------- resolution
@pytest.fixture
def fake_split(monkeypatch, server, tmp_path):
    """perov_5:val published as BODY on the local server; an empty cache; downloads on."""
    monkeypatch.setitem(DATASET_FILES, ("perov_5", "val"), DatasetFile("unused", DIGEST, len(BODY)))
    monkeypatch.setenv("AUTOPERI_DATA_MIRROR", f"{server}/mirror")
    monkeypatch.setenv("AUTOPERI_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("AUTOPERI_DATA", raising=False)
    monkeypatch.delenv("AUTOPERI_OFFLINE", raising=False)
    return tmp_path


def _put(root: Path, name: str = "perov_5", split: str = "val", suffix: str = ".csv") -> Path:
    p = root / name / f"{split}{suffix}"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(str(root))
    return p


def test_resolution_order(fake_split, monkeypatch):
    root = fake_split
    # 4. nothing local: downloaded into the cache, verified
    got = resolve_dataset("perov_5:val")
    assert got == root / "cache" / "datasets" / "perov_5" / "val.csv"
    assert got.read_bytes() == BODY
    # 3. the cache is used before any download (the server would not be asked again)
    monkeypatch.setenv("AUTOPERI_DATA_MIRROR", "http://127.0.0.1:9/none")
    assert resolve_dataset("perov_5:val") == got
    # 2. $AUTOPERI_DATA before the cache
    env = _put(root / "env", suffix=".csv.xz")
    monkeypatch.setenv("AUTOPERI_DATA", str(root / "env"))
    assert resolve_dataset("perov_5:val") == env
    # 1. --data-dir before $AUTOPERI_DATA
    explicit = _put(root / "explicit", suffix=".csv.gz")
    assert resolve_dataset("perov_5:val", data_dir=root / "explicit") == explicit
    # an explicit path is itself
    assert resolve_dataset(str(explicit)) == explicit


def test_offline_and_failed_download_errors(fake_split, monkeypatch, server):
    monkeypatch.setenv("AUTOPERI_OFFLINE", "1")
    with pytest.raises(DatasetError) as e:
        resolve_dataset("perov_5:val")
    msg = str(e.value)
    assert "AUTOPERI_OFFLINE" in msg and DIGEST in msg and "perov_5/val.csv" in msg
    assert str(fake_split / "cache" / "datasets" / "perov_5" / "val.csv") in msg
    with pytest.raises(DatasetError, match="no download"):
        resolve_dataset("perov_5:val", download=False)
    monkeypatch.delenv("AUTOPERI_OFFLINE")
    monkeypatch.setitem(
        DATASET_FILES, ("perov_5", "val"), DatasetFile("unused", "0" * 64, len(BODY))
    )
    with pytest.raises(DatasetError, match=r"download failed: .*checksum mismatch.*put it at"):
        resolve_dataset("perov_5:val")
    assert not (fake_split / "cache" / "datasets" / "perov_5" / "val.csv").exists()
    _no_partial(fake_split / "cache" / "datasets" / "perov_5")


def test_partial_train_is_its_own_split(fake_split, monkeypatch):
    root = fake_split
    part = _put(root / "d", "mp_20", "train_partial", ".csv.xz")
    monkeypatch.setenv("AUTOPERI_DATA", str(root / "d"))
    assert resolve_dataset("mp_20:train_partial") == part
    monkeypatch.setenv("AUTOPERI_OFFLINE", "1")
    with pytest.raises(DatasetError, match="not found locally"):  # never the partial file
        resolve_dataset("mp_20:train")
    monkeypatch.delenv("AUTOPERI_DATA")
    with pytest.raises(DatasetError, match="15,455 of the 27,136.*cannot be downloaded"):
        resolve_dataset("mp_20:train_partial")
    with pytest.raises(DatasetError, match="unknown split 'train_partial' of 'perov_5'"):
        resolve_dataset("perov_5:train_partial")


def test_registry_digests_match_the_shared_copies():
    """The registry's sizes and digests are those of the bytes: every split the shared data
    folder holds byte-identical to the published file (plain, or xz-compressed) is checked."""
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not shared.is_dir():
        pytest.skip("no shared data folder beside the checkout")
    checked = []
    for (name, split), f in DATASET_FILES.items():
        plain, xz = shared / name / f"{split}.csv", shared / name / f"{split}.csv.xz"
        if plain.is_file():
            data = plain.read_bytes()
        elif xz.is_file() and (name, split) not in _REWRITTEN:
            data = lzma.decompress(xz.read_bytes())
        else:
            continue
        assert (len(data), hashlib.sha256(data).hexdigest()) == (f.size, f.sha256), (name, split)
        checked.append(f"{name}:{split}")
    # Perov-5 x 3 (DiffCSP), Carbon-24 val / test (CDVAE), MPTS-52 val / test (DiffCSP)
    assert len(checked) == 7, checked
    raw = "https://raw.githubusercontent.com/"
    assert all(f.url.startswith(raw) for f in DATASET_FILES.values())
    assert {n for n, _ in DATASET_FILES} == set(datasets.DATASETS)
