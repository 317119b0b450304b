"""flowscale bench reference: the parameter-count check, the table from real flowscale timings,
and (when FLOWSCALE_REFERENCE_GLOW points at a reference model.py, e.g. a clone of
rosinality/glow-pytorch) the side-by-side run against it."""

import os
from pathlib import Path

import pytest

from flowscale.tools.bench.reference import (ReferenceMismatch, check_param_counts, format_table, load_reference,
                                       measure)

REF = os.environ.get("FLOWSCALE_REFERENCE_GLOW")
needs_ref = pytest.mark.skipif(not REF, reason="set FLOWSCALE_REFERENCE_GLOW to a reference Glow model.py "
                                               "(e.g. rosinality/glow-pytorch, fetched yourself) to run this")


def test_parameter_counts_must_agree_to_one_percent():
    assert check_param_counts(11_057_616, 11_040_624) < 0.01
    with pytest.raises(ReferenceMismatch, match=r"differ by 2\.00%.*100,000.*102,000.*not the same architecture"):
        check_param_counts(100_000, 102_000)


def test_missing_reference_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "model.py")):
        load_reference(tmp_path)


def test_table_from_real_flowscale_timings():
    row = measure(k=2, levels=3, width=16, batch=2, repeats=1, warmup=0, per_level=True, level_repeats=1)
    assert set(row["step_ms"]) == {"plain", "inverse"} and all(v > 0 for v in row["step_ms"].values())
    assert row["params"]["plain"] == row["params"]["inverse"]
    assert row["saved_mib"]["inverse"] < row["saved_mib"]["plain"]
    assert [lv["level"] for lv in row["levels_ms"]] == [0, 1, 2]
    table = format_table([row])
    lines = table.splitlines()
    assert lines[0].startswith("| K | params ref / flowscale | reference plain ms")
    line = next(x for x in lines if x.startswith("| 2 | - / "))  # no reference: its columns are '-'
    assert f"{row['step_ms']['plain']:.0f} ms (-)" in line and f"| {row['saved_mib']['inverse']:.1f} |" in line
    levels = [x for x in lines if x.startswith("| 2 | ") and x.count("|") == 10]
    assert len(levels) == 3 and levels[0].startswith("| 2 | 0 | 12x16x16 |")
    assert "floor" in table and f"- K=2: plain {row['fastest_ms']['plain']:.0f} ms, inverse" in table


@needs_ref
def test_real_reference_side_by_side():
    ref = load_reference(Path(REF))
    row = measure(k=8, levels=3, width=512, batch=2, repeats=1, warmup=0, ref_module=ref, per_level=False)
    n = row["params"]
    assert abs(n["reference"] - n["plain"]) <= 0.01 * n["reference"]
    line = format_table([row]).splitlines()[2]
    ref_ms = row["step_ms"]["reference"]
    assert line.startswith(f"| 8 | {n['reference'] / 1e6:.2f}M / {n['plain'] / 1e6:.2f}M | {ref_ms:.0f} |")
    assert f"({row['step_ms']['plain'] / ref_ms:.2f}x)" in line


@needs_ref
def test_real_reference_of_another_size_is_refused():
    # At width 64 the reference's top-level prior conv (independent of width) is 18% of its
    # parameters: flowscale's learned top prior is a per-channel mean and scale.
    with pytest.raises(ReferenceMismatch, match="parameter counts differ"):
        measure(k=2, levels=3, width=64, batch=2, repeats=1, warmup=0, ref_module=load_reference(Path(REF)),
                per_level=False)
