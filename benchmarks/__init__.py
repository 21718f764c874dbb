"""Benchmarks (run as modules: `python -m benchmarks.NAME`); helpers to write their RESULTS.md sections.

Each benchmark owns the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``; other sections
(other benchmarks, other authors) are left untouched.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# /proc/cpuinfo flag -> name, widest first.
VECTOR_EXTENSIONS = (("avx512f", "AVX-512"), ("avx2", "AVX2"))


def cpu_model() -> str:
    """The CPU's model name and widest vector extension,
    e.g. "Intel(R) Xeon(R) Processor (family 6, model 207), AVX-512".

    The sessions of this project have run on different CPUs (AVX2, AMD EPYC and Intel Xeon with
    AVX-512), and speed ratios between engines depend on which: a figure without it cannot be compared.
    """
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    pairs = (line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in pairs}
    flags = set(fields.get("flags", "").split())
    vector = next((name for flag, name in VECTOR_EXTENSIONS if flag in flags), "no AVX2")
    name = fields.get("model name", platform.machine())
    return f"{name} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}), {vector}"


def machine() -> str:
    """One line about where the numbers came from."""
    import onnxruntime

    cpus = len(os.sched_getaffinity(0))
    return (
        f"{cpu_model()}, {cpus} CPUs visible, Python "
        f"{sys.version.split()[0]}, numpy {np.__version__}, onnxruntime {onnxruntime.__version__}"
    )


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md with ``body``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), flags=re.S)
    appended = text.rstrip() + "\n\n" + block + "\n"
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else appended
    path.write_text(text)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
