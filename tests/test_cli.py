"""The ``autoperi`` entry point: a parser that imports no heavy dependency, and the persistent
compilation cache (where it goes, how it is turned off, and that a second process loads what
the first compiled). Each case runs in a fresh interpreter: imports and JAX's cache settings
are per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp
    from autoperi_jax.cli import configure_compilation_cache

    events = []
    jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
    folder = configure_compilation_cache()
    y = jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)(jnp.ones((8, 8)))
    print(json.dumps({
        "folder": folder,
        "hits": events.count("/jax/compilation_cache/cache_hits"),
        "value": float(y.sum()),
    }))
    """
)


def _run(tmp_path: Path, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "AUTOPERI_"))}
    environ.update(AUTOPERI_CACHE=str(tmp_path / "cache"), **env)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _entries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_default_folder_is_under_autoperi_cache_and_a_second_process_hits_it(tmp_path):
    first = _run(tmp_path)
    folder = tmp_path / "cache" / "xla"
    assert first["folder"] == str(folder)
    assert first["hits"] == 0 and _entries(folder)  # compiled and written
    second = _run(tmp_path)
    assert second["hits"] >= 1  # loaded, not compiled
    assert second["value"] == first["value"]


@pytest.mark.parametrize("value", ["off", "0"])
def test_off_writes_nothing(tmp_path, value):
    out = _run(tmp_path, AUTOPERI_XLA_CACHE=value)
    assert out["folder"] is None
    assert not (tmp_path / "cache" / "xla").exists()


def test_explicit_folders_win(tmp_path):
    mine = tmp_path / "mine"
    assert _run(tmp_path, AUTOPERI_XLA_CACHE=str(mine))["folder"] == str(mine)
    assert _entries(mine) and not (tmp_path / "cache" / "xla").exists()
    # JAX's own variable is JAX's business: left as it is, and it is used
    jaxdir = tmp_path / "jax"
    out = _run(tmp_path, JAX_COMPILATION_CACHE_DIR=str(jaxdir), AUTOPERI_XLA_CACHE=str(mine))
    assert out["folder"] == str(jaxdir)


def test_building_the_parser_imports_no_heavy_dependency(tmp_path):
    """``autoperi --help`` and every command start without jax-md, e3nn-jax or pymatgen
    (``autoperi --help`` took 7 s, nearly all of it jax-md's import, paid to show two option
    defaults; 0.2 s without); the commands that need them import them when they run."""
    code = (
        "import sys; from autoperi_jax.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('jax_md', 'e3nn_jax', 'pymatgen', 'eval.metrics') "
        "if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def test_every_command_but_bench_uses_the_cache():
    from autoperi_jax.cli import build_parser

    parser = build_parser()
    bench = parser.parse_args(["bench", "--out", "b.json"])
    sample = parser.parse_args(["sample", "--pretrained", "perov_5", "-n", "1", "--out", "s"])
    assert bench.xla_cache is False  # compilations are what it counts
    assert getattr(sample, "xla_cache", True) is True
