"""`autoperi bench`: its scaling probes run and time what they say, and the report renders."""

from __future__ import annotations

import json

import pytest

from autoperi_jax.api import pretrained_path
from eval.bench import atom_scaling, markdown


@pytest.mark.slow  # 30-60 s: the default run stays under 15 min on 2 cores
def test_atom_scaling_probe_runs_on_the_shipped_architecture():
    out = atom_scaling(pretrained_path("perov_5"), [6], batch_size=4, repeats=1, nfe=1)
    assert [r["atoms"] for r in out] == [6]
    assert all(r["call_s"] > 0 and r["ms_per_crystal"] == pytest.approx(250 * r["call_s"])
               for r in out)  # fmt: skip
    assert all(r["train_ms_per_crystal"] > 0 for r in out)


def test_markdown_report_has_every_section():
    result = {
        "info": {"command": "autoperi bench --out b.json", "machine": "x", "cpu_count": 2,
                 "jax_backend": "cpu", "load_average_start": (0.5, 0, 0), "wall_s": 10.0},
        "data": {"structures": 10, "cold_preprocess_s": 2.0, "cached_load_s": 0.1,
                 "cache_speedup": 20.0, "padding_waste_nodes": 0.01, "padding_waste_edges": 0.05},
        "train": [{"devices": 1, "batch_size": 128, "crystals_per_s": 200.0, "step_s": 0.64,
                   "epoch_s": 57.0, "compilations_per_epoch": 2, "compile_s": 30.0}],
        "sample": [{"mode": "plain", "batch_size": 256, "valid_per_s": 150.0,
                    "crystals_per_s": 160.0, "validity": 0.98, "nfe": 5, "nfe_per_sample": 6.25,
                    "sample_fn_compiles": 1}],
        "batch_scaling": [{"batch_size": 16, "ms_per_crystal": 8.0, "call_s": 0.128}],
        "atom_scaling": [{"atoms": 5, "ms_per_crystal": 4.0, "call_s": 0.2},
                         {"atoms": 10, "ms_per_crystal": 10.0, "call_s": 0.5}],
    }  # fmt: skip
    md = markdown(json.loads(json.dumps(result)))
    for text in ("200 crystals/s", "57 s/epoch", "150.0 valid crystals/s",
                 "NFE 6.25 per sample (5 per", "| 16 | 8.00 |", "| 10 | 10.00 | 2.50x |",
                 "20x"):  # fmt: skip
        assert text in md, text
