"""docs/tasks.md against BENCHMARKS.md, and the torch-free example client's exit code for a user error."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATE = re.compile(r"(\d{4}-\d{2})-(\d{2})(?:/(\d{2}))?")


def _flat(text: str) -> str:
    """Markdown prose as one line: block-quote markers dropped, whitespace collapsed."""
    return " ".join(" ".join(re.sub(r"^> ?", "", line) for line in text.splitlines()).split())


def _benchmark_sections() -> list[tuple[list[str], list[str]]]:
    """Each BENCHMARKS.md heading and bold run-in heading as (the names it is cited by, its dates)."""
    sections = []
    for line in (REPO / "BENCHMARKS.md").read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip()
            names = [title]
            if m := re.fullmatch(r"(.*) \((.*)\)", title):  # "Recipes again (2026-12-06, thirty-eighth session)"
                names += [m.group(1), f"{m.group(1)}, {m.group(2).split(', ')[-1]}"]
            dates = [f"{a}-{d}" for a, b, c in DATE.findall(title) for d in (b, c) if d]
            sections.append((names, dates))
        elif m := re.match(r"\*\*(.+?)\*\*", line):
            sections.append(([m.group(1)], []))
    return sections


def test_tasks_md_cites_benchmark_sections_within_its_dates():
    """Every `BENCHMARKS.md "NAME"` in docs/tasks.md names a section there, and the page's stated session
    dates span the dates of every section it cites."""
    text = _flat((REPO / "docs" / "tasks.md").read_text())
    first, last = re.search(r"working session, (\d{4}-\d{2}-\d{2}) to (\d{4}-\d{2}-\d{2})", text).groups()
    sections = _benchmark_sections()
    cited = re.findall(r'BENCHMARKS\.md,? "([^"]+)"', text)
    assert len(cited) >= 15, cited
    for name in cited:
        pieces = [p.strip(" .,") for p in name.split("...") if p.strip(" .,")]
        hits = [dates for names, dates in sections if any(all(p in n for p in pieces) for n in names)]
        assert hits, f"docs/tasks.md cites BENCHMARKS.md {name!r}, which has no such section"
        dates = [d for ds in hits for d in ds]
        assert all(first <= d <= last for d in dates), f"{name!r} is dated {dates}, the page says {first} to {last}"


def test_onnx_inference_refuses_an_existing_out_with_exit_code_2(tmp_path):
    """An --out that exists is a user error: one line, exit code 2, the file left as it was."""
    out = tmp_path / "embeddings.npz"
    out.write_bytes(b"the user's own file")
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "onnx_inference.py"), str(tmp_path / "m.onnx"),
                           str(tmp_path), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.strip().splitlines() == [f"error: {out} already exists; give another --out or move it away"]
    assert out.read_bytes() == b"the user's own file" and proc.stdout == ""


def test_onnx_inference_refuses_a_missing_model_in_one_line(tmp_path):
    """A model path that does not exist: one line, exit code 2 (was onnxruntime's traceback)."""
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "onnx_inference.py"), str(tmp_path / "no.onnx"),
                           str(tmp_path), "--out", str(tmp_path / "e.npz")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.strip().splitlines() == [f"error: model '{tmp_path / 'no.onnx'}' does not exist; give the "
                                                "encoder.onnx of `sslkit export`"]
