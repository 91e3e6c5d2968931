"""No module of fedit grows past ~600 lines (issue 27): a file that does would be the next
switchboard every feature edits (config.py was 1,366 lines, engine/rounds.py 604)."""

from __future__ import annotations

from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "fedit"
MAX_LINES = 600


def test_no_source_file_is_over_600_lines() -> None:
    sizes = {path: len(path.read_text(encoding="utf-8").splitlines()) for path in SRC.rglob("*.py")}
    too_long = {str(p.relative_to(SRC)): n for p, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"split these modules: {too_long}"
