"""argparse types shared by the benchmark scripts: a bad number or path is refused up front, argparse-style
(``usage: ... error: ...``, exit status 2), not as a traceback after minutes of work."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Callable, List


def count(minimum: int = 1) -> Callable[[str], int]:
    """An int >= ``minimum`` (``type=count()`` for steps, batch sizes, widths, repeats, threads)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def count_list(minimum: int = 1) -> Callable[[str], List[int]]:
    """A comma-separated list of ints >= ``minimum`` (e.g. ``--widths 1,2,4``), at least one."""
    one = count(minimum)

    def parse(text: str) -> List[int]:
        parts = [part.strip() for part in text.split(",")]
        if not text.strip() or any(not part for part in parts):
            raise argparse.ArgumentTypeError(f"expected comma-separated ints >= {minimum}, e.g. 1,2,4; got {text!r}")
        values = [one(part) for part in parts]
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{text!r} lists a value twice; give each once")
        return values

    parse.__name__ = "comma-separated ints"
    return parse


def _writable(folder: Path, what: str) -> None:
    """Refuse a folder no file can be written into (tried with a temporary file, removed at once)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{what}: cannot write into {folder} ({e.strerror or e})") from None


def new_file(text: str) -> Path:
    """A file path whose folder exists and can be written (checked before the run, not when the result is
    written)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the file path is empty; give a file path")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file path")
    if not path.parent.is_dir():
        why = "is a file, not a folder" if path.parent.exists() else "does not exist; create it first"
        raise argparse.ArgumentTypeError(f"the folder {path.parent} {why}")
    _writable(path.parent, text)
    return path


def plot_file(text: str) -> Path:
    """:func:`new_file` whose extension is an image format matplotlib writes (png, pdf, svg, ...)."""
    path = new_file(text)
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise argparse.ArgumentTypeError(
            f"{text}: matplotlib cannot write {path.suffix or 'a file without an extension'}; use one of "
            f"{', '.join('.' + f for f in sorted(formats))}"
        )
    return path


def out_dir(text: str) -> Path:
    """An output folder: an existing folder or a path that can be made one (not an existing file, nor below
    one), and that can be written into (the folder, or the nearest one above it that exists). It is made
    by the run, not here: a command refused for another argument leaves nothing behind."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the output folder is empty; give a folder path")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    above = path.absolute()
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise argparse.ArgumentTypeError(f"cannot make the folder {text}: {above} is a file")
    _writable(above, text)
    return path
