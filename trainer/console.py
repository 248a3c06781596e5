"""The job's console: what it started, one live progress line, checkpoint notices, results and paths."""

from __future__ import annotations

import re
import sys
from pathlib import Path


class ConsolePrinter:
    """Prints console lines. On a terminal the progress lines ("step  N/M ...") redraw one live line; elsewhere (a
    file, `ray job logs`) each is its own line."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.open = False  # a progress line is on screen without its newline

    def __call__(self, line: str) -> None:
        if self.live and line.startswith("step "):
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
            self.open = True
            return
        if self.open:
            self.stream.write("\n")
            self.open = False
        print(line, file=self.stream, flush=True)

    def end(self) -> None:
        """Finish the live line (before others print on the same stream)."""
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False


WARNING = re.compile(r"\b(WARNING|WARN|ERROR|Traceback)\b")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def log_warnings(log_file: Path, start: int = 0) -> str | None:
    """One line summarising the warnings and errors written to a framework log since byte `start`, or None."""
    try:
        with open(log_file, "rb") as f:
            f.seek(start)
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if WARNING.search(ln)]
    except OSError:
        return None
    if not lines:
        return None
    first = re.sub(r"\s+:?\s*", " ", WARNING.sub("", ANSI.sub("", lines[0]))).strip()[:120]
    return f"note: Ray or the libraries logged {len(lines)} warning(s)/error(s), the first: \"{first}\"; read {log_file}"
