"""Results table of a shipped pretrained model, rendered from `autoperi eval` output.

The numbers in the README's results table are never typed by hand: `autoperi eval`
writes ``metrics.json``; ``collect`` copies those files next to the shipped model
(``autoperi_jax/pretrained/NAME/eval/{gen,...,csp,csp_rank}.json``), ``table`` renders the
Markdown table from them, and ``check`` (also run by tests/test_pretrained.py) fails when
the README's table differs from what the shipped ``metrics.json`` files say::

  python -m eval.model_card collect --gen runs/pre/eval_gen --recon runs/pre/eval_recon \\
      --gen-unique runs/pre/eval_gen_unique --demo demo/report
  python -m eval.model_card table            # prints the Markdown block
  python -m eval.model_card check README.md  # exit 1 on a mismatch
  python -m eval.model_card write README.md  # replace the README block

``--name mp_20`` (before the command) does the same for another shipped model; each model
has its own block in the README (`markers`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["check_readme", "markers", "render_table", "results_dir"]


def markers(name: str = "perov_5") -> tuple[str, str]:
    """The README lines that open and close the results block of the shipped model."""
    cmd = "python -m eval.model_card" + ("" if name == "perov_5" else f" --name {name}")
    return (
        f"<!-- pretrained-results:{name}:start ({cmd} write README.md) -->",
        f"<!-- pretrained-results:{name}:end -->",
    )


# (metrics.json key, label, kind): kind "pct" = rate shown in %, "num" = 4 decimals.
GEN_ROWS = (
    ("struct_validity", "structural validity", "pct"),
    ("comp_validity", "compositional validity (SMACT)", "pct"),
    ("cov_recall", "COV-R", "pct"),
    ("cov_precision", "COV-P", "pct"),
    ("emd_density", "EMD density (g/cm3)", "num"),
    ("emd_num_elements", "EMD #elements", "num"),
    ("emd_property", "EMD property (our predictor on both sides; not comparable)", "num"),
    ("uniqueness", "uniqueness (valid)", "pct"),
    ("novelty", "novelty vs train (valid)", "pct"),
)
RECON_ROWS = (
    ("match_rate", "reconstruction match rate (valid predictions, CDVAE matcher)", "pct"),
    ("rmse", "reconstruction RMSE (normalised by (V/N)^(1/3))", "num"),
    ("match_rate_ceiling", "match-rate ceiling: share of valid reference crystals", "pct"),
    ("spacegroup_preserved", "space group preserved by reconstruction (spglib 0.1)", "pct"),
)
DEMO_ROWS = (*GEN_ROWS[:6], GEN_ROWS[7])  # no novelty: the demo evaluates without --train
GEN_EXTRA_ROWS = (
    ("unique_novel_rate", "unique and novel (valid)", "pct"),
    ("novel_p1_share", "space group P1 among novel samples (spglib 0.1)", "pct"),
)
CSP_ROWS = (
    ("match_rate_k1", "match rate, k = 1", "pct"),
    ("rmse_k1", "RMSE, k = 1 (normalised by (V/N)^(1/3))", "num"),
    ("match_rate_k20", "match rate, k = 20", "pct"),
    ("rmse_k20", "RMSE, k = 20", "num"),
    ("match_rate_ceiling_k1", "k = 1 ceiling: one answer per composition (polymorphs)", "pct"),
)
CSP_RANK_ROWS = (
    ("match_rate_k1", "match rate, k = 1, `--rank` (first of 8 draws by consensus)", "pct"),
    ("rmse_k1", "RMSE, k = 1, `--rank`", "num"),
)
PUBLISHED = ("CDVAE", "DiffCSP")
CSP_PUBLISHED = ("DiffCSP", "FlowMM")
FILES = {
    "gen": GEN_ROWS,
    "gen_unique": GEN_ROWS,
    "gen_raw": GEN_ROWS,
    "recon": RECON_ROWS,
    "demo": DEMO_ROWS,
    "csp": CSP_ROWS,
    "csp_rank": CSP_RANK_ROWS,
}
TITLES = {
    "gen": "Generation, 10,000 samples (seed 0) vs the test crystals",
    "gen_unique": "Generation with `--unique` (10,000 mutually distinct samples, seed 0) vs the "
    "test crystals",
    "gen_raw": "Generation with `--no-checks` (10,000 samples as drawn, seed 0) vs the test "
    "crystals",
    "recon": "Reconstruction of the test crystals",
    "demo": "`make demo`: 1,200 samples (seed 0) vs the test crystals",
    "csp": "Structure prediction: 20 predictions (seed 0) for each test composition",
    "csp_rank": "Structure prediction, 8 predictions per test composition ranked by "
    "consensus (`--rank`), k = 1",
}
# The first lines of each model's block.
INTROS = {
    "perov_5": "Perov-5 test split (3,785 crystals), CDVAE's protocol: 10,000 generated "
    "samples (seed 0; EMDs over 10 draws of 1,000 valid samples), and the reconstruction of "
    "every test crystal.",
    "mp_20": "MP-20 test split (9,046 crystals), CDVAE's protocol: 10,000 generated samples "
    "(seed 0; EMDs over 10 draws of 1,000 valid samples), and the reconstruction of every "
    "test crystal. The model was trained on 15,455 of the 27,136 MP-20 train crystals "
    "(novelty is measured against those 15,455); the published models on all of them.",
}
# The commands that produced each metrics file (the eval command is also recorded
# inside the file as inputs.command).
# (NAME = the shipped model, which is also the dataset's name.)
COMMANDS = {
    "gen": (
        "autoperi sample --pretrained NAME -n 10000 --seed 0 --out gen.extxyz",
        "autoperi eval --task gen --samples gen.extxyz --reference NAME:test "
        "--train NAME:train --out OUT",
    ),
    "gen_unique": (
        "autoperi sample --pretrained NAME -n 10000 --seed 0 --unique --out gen.extxyz",
        "autoperi eval --task gen --samples gen.extxyz --reference NAME:test "
        "--train NAME:train --no-plots --out OUT",
    ),
    "gen_raw": (
        "autoperi sample --pretrained NAME -n 10000 --seed 0 --no-checks --out raw.extxyz",
        "autoperi eval --task gen --samples raw.extxyz --reference NAME:test "
        "--train NAME:train --no-plots --out OUT",
    ),
    "recon": (
        "autoperi reconstruct --pretrained NAME --split test --out recon.extxyz",
        "autoperi eval --task recon --samples recon.extxyz --reference NAME:test --out OUT",
    ),
    "demo": ("make demo",),
    "csp": (
        "autoperi csp --pretrained NAME --split test -n 20 --seed 0 --out csp.extxyz",
        "autoperi eval --task csp --samples csp.extxyz --reference NAME:test --k 1,20 --out OUT",
    ),
    "csp_rank": (
        "autoperi csp --pretrained NAME --split test -n 8 --rank --seed 0 --out rank.extxyz",
        "autoperi eval --task csp --samples rank.extxyz --reference NAME:test --k 1 --out OUT",
    ),
}

# Where a model's commands differ from the template: MP-20's train split here is the
# partial one, and its fingerprint distance to the train split is skipped (25 CPU-min).
COMMAND_OVERRIDES = {
    "mp_20": {
        "gen": (
            COMMANDS["gen"][0],
            "autoperi eval --task gen --samples gen.extxyz --reference mp_20:test "
            "--train mp_20:train_partial --no-novelty-distance --out OUT",
        ),
        "gen_raw": (
            COMMANDS["gen_raw"][0],
            "autoperi eval --task gen --samples raw.extxyz --reference mp_20:test "
            "--train mp_20:train_partial --no-novelty-distance --no-plots --out OUT",
        ),
    },
}


def results_dir(name: str = "perov_5") -> Path:
    """``autoperi_jax/pretrained/NAME/eval``: the shipped model's `autoperi eval` output."""
    from autoperi_jax.api import pretrained_path

    return pretrained_path(name) / "eval"


def _fmt(value: Any, kind: str, std: Any = None) -> str:
    if value is None:
        return "n/a"
    if kind == "pct":
        return f"{100 * value:.2f} %"
    text = f"{value:.4f}"
    return f"{text} +- {std:.4f}" if std is not None else text


def _load(folder: Path, kind: str) -> dict | None:
    path = folder / f"{kind}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _published(d: dict, key: str, fmt: str, col: str) -> str:
    """A published value, or "" (published property EMDs used each paper's own predictor:
    not comparable)."""
    values = d.get("published", {}).get("models", {}).get(col, {}).get("values") or {}
    text = _fmt(values.get(key), fmt) if key != "emd_property" else ""
    return "" if text == "n/a" else text


def _ours(d: dict | None, key: str, fmt: str) -> str:
    if d is None:
        return ""
    m = d["metrics"]
    return _fmt(m.get(key), fmt, m.get(f"{key}_std"))


def render_table(name: str = "perov_5", folder: Path | None = None) -> str:
    """The Markdown block (between `START` and `END`) for the shipped model ``name``: one
    table (generation, with and without ``--unique``, and reconstruction beside the
    published numbers), the demo's figures in a line, and the file and commands of each."""
    folder = results_dir(name) if folder is None else Path(folder)
    d = {kind: _load(folder, kind) for kind in FILES}
    gen, unique, raw, recon = d["gen"], d["gen_unique"], d["gen_raw"], d["recon"]
    start, end = markers(name)
    lines = [start, ""]
    lines.append(INTROS.get(name, f"{name} test split."))
    lines.append("")
    gen_cols = ["shipped model"] + (["shipped, `--unique`"] if unique else [])
    gen_cols += ["shipped, `--no-checks`"] if raw else []
    rows = []
    if not (gen or recon):
        lines.append("No `autoperi eval` output is shipped with this model yet.")
    else:
        lines.append("| metric | " + " | ".join(gen_cols) + " | " + " | ".join(PUBLISHED) + " |")
        lines.append("|---" * (1 + len(gen_cols) + len(PUBLISHED)) + "|")
    if gen:
        rows += [(label, key, fmt, gen) for key, label, fmt in GEN_ROWS]
        rows += [
            (label, key, fmt, gen) for key, label, fmt in GEN_EXTRA_ROWS if key in gen["metrics"]
        ]
    if recon:
        rows += [(label, key, fmt, recon) for key, label, fmt in RECON_ROWS]
    for label, key, fmt, src in rows:
        ours = [_ours(src, key, fmt)]
        for extra in (unique, raw):
            if extra:
                ours.append(_ours(extra, key, fmt) if src is gen else "")
        theirs = [_published(src, key, fmt, c) for c in PUBLISHED]
        lines.append(f"| {label} | " + " | ".join(ours + theirs) + " |")
    lines.append("")
    demo = d["demo"]
    if demo:
        # The demo's 1,200 samples are not the protocol's 10,000 (COV-R grows with n), so
        # no published numbers beside it.
        figures = ", ".join(f"{label} {_ours(demo, key, fmt)}" for key, label, fmt in DEMO_ROWS)
        lines.append(f"`make demo` (1,200 samples, seed 0): {figures}.")
        lines.append("")
    csp, ranked = d["csp"], d["csp_rank"]
    if csp or ranked:
        lines.append(
            "Crystal structure prediction on the same test split, DiffCSP's protocol: k "
            "predictions per test composition from the shipped composition flow; a test "
            "crystal is matched if one of its first k valid predictions matches it (CDVAE "
            "matcher), RMSE over the matched ones."
        )
        lines.append("")
        lines.append("| metric | shipped CSP flow | " + " | ".join(CSP_PUBLISHED) + " |")
        lines.append("|---" * (2 + len(CSP_PUBLISHED)) + "|")
        rows = [(key, label, fmt, csp) for key, label, fmt in CSP_ROWS] if csp else []
        if ranked:
            rows[2:2] = [(key, label, fmt, ranked) for key, label, fmt in CSP_RANK_ROWS]
            if not csp:  # the ceiling depends on the reference only
                rows.append((*CSP_ROWS[-1], ranked))
        for key, label, fmt, src in rows:
            theirs = [_published(src, key, fmt, c) for c in CSP_PUBLISHED]
            lines.append(f"| {label} | " + " | ".join([_ours(src, key, fmt), *theirs]) + " |")
        lines.append("")
    lines.append(f"Files (in `autoperi_jax/pretrained/{name}/eval/`) and their commands:")
    lines.append("")
    for kind in FILES:
        if d[kind] is None:
            continue
        commands = COMMAND_OVERRIDES.get(name, {}).get(kind, COMMANDS[kind])
        cmds = "; ".join(f"`{c.replace('NAME', name)}`" for c in commands)
        wall = d[kind].get("wall_time_s")
        lines.append(f"- `{kind}.json`: {cmds} (evaluation {wall:.0f} s on 2 CPU cores)")
    lines.append("")
    lines.append(end)
    return "\n".join(lines)


def _block(text: str, name: str) -> str | None:
    start, end = markers(name)
    i, j = text.find(start), text.find(end)
    if i < 0 or j < 0:
        return None
    return text[i : j + len(end)]


def check_readme(readme: str | Path, name: str = "perov_5") -> list[str]:
    """Differences between the README's results block and the shipped metrics (empty =
    they agree)."""
    have = _block(Path(readme).read_text(), name)
    if have is None:
        start, end = markers(name)
        return [f"{readme}: no results block ({start} ... {end})"]
    want = render_table(name)
    if have == want:
        return []
    a, b = have.splitlines(), want.splitlines()
    diffs = [f"README: {x!r}\nshipped: {y!r}" for x, y in zip(a, b) if x != y]
    if len(a) != len(b):
        diffs.append(f"README block has {len(a)} lines, the rendered one {len(b)}")
    return diffs


def _collect(args: argparse.Namespace) -> int:
    out = results_dir(args.name)
    out.mkdir(exist_ok=True)
    for kind in FILES:
        src = getattr(args, kind)
        if src:
            shutil.copyfile(Path(src) / "metrics.json", out / f"{kind}.json")
            print(f"{Path(src) / 'metrics.json'} -> {out / f'{kind}.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.model_card", description=__doc__)
    p.add_argument("--name", default="perov_5", help="shipped model (default perov_5)")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="copy autoperi eval output next to the shipped model")
    for kind in FILES:
        c.add_argument(
            f"--{kind.replace('_', '-')}",
            dest=kind,
            help=f"`autoperi eval` output folder ({TITLES[kind]})",
        )
    sub.add_parser("table", help="print the Markdown block")
    for cmd in ("check", "write"):
        sub.add_parser(cmd, help=f"{cmd} the README block").add_argument("readme")
    args = p.parse_args(argv)
    if args.cmd == "collect":
        return _collect(args)
    if args.cmd == "table":
        print(render_table(args.name))
        return 0
    if args.cmd == "check":
        diffs = check_readme(args.readme, args.name)
        for d in diffs:
            print(d)
        print("README results table matches the shipped metrics" if not diffs else "MISMATCH")
        return 1 if diffs else 0
    text = Path(args.readme).read_text()
    old = _block(text, args.name)
    new = render_table(args.name)
    if old is None:
        start, end = markers(args.name)
        raise SystemExit(f"{args.readme}: add the two marker lines first:\n{start}\n{end}")
    Path(args.readme).write_text(text.replace(old, new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
