"""Text for calibration and evaluation, and its tokenization into fixed windows.

Sources:
- the Jane Austen novels of the Debian package ``r-cran-janeaustenr`` (public domain,
  six books, ~1M tokens): :func:`austen_books`. Works offline once the package is there.
- any local text files: :func:`read_text_files`.
- WikiText-2 / C4 through the ``datasets`` package when it and the hub are reachable:
  :func:`hf_text`.

Calibration and evaluation text must not overlap (calibrating on the evaluation text would
flatter every method). The default Austen split evaluates on the beginning of *Pride and
Prejudice* and calibrates on *Emma*: different books, so disjoint by construction.

Example::

    books = austen_books()
    split = austen_split(tokenizer)        # eval: P&P 16 x 1024, calib: Emma 64 x 512
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

__all__ = [
    "CorpusNotFoundError",
    "AUSTEN_BOOKS",
    "austen_books",
    "find_austen_data",
    "fetch_austen_deb",
    "read_text_files",
    "hf_text",
    "tokenize",
    "token_windows",
    "TextSplit",
    "austen_split",
    "default_cache_dir",
]

# Object names inside the R package's data archive.
AUSTEN_BOOKS = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)

_AUSTEN_DEB = "r-cran-janeaustenr"
_AUSTEN_REL = Path("janeaustenr") / "data" / "Rdata.rdx"
# Where R installs site libraries on Debian/Ubuntu and from source.
_R_LIBRARY_DIRS = (
    "/usr/lib/R/site-library",
    "/usr/local/lib/R/site-library",
    "/usr/lib/R/library",
    "/usr/local/lib/R/library",
)
_AUSTEN_HELP = (
    "the Jane Austen corpus (Debian package r-cran-janeaustenr) was not found. Install it with "
    "`apt-get install r-cran-janeaustenr`, or without root: `apt-get download r-cran-janeaustenr "
    "&& dpkg-deb -x r-cran-janeaustenr_*.deb DIR` and pass DIR (or set PALU_FX_AUSTEN_DIR); "
    "`austen_books(download=True)` does the latter into the cache directory when apt is available"
)


class CorpusNotFoundError(FileNotFoundError):
    """A text corpus is not available locally; the message says how to get it."""


def default_cache_dir() -> Path:
    """``$PALU_FX_CACHE`` or ``~/.cache/palu_fx``."""
    return Path(os.environ.get("PALU_FX_CACHE", Path.home() / ".cache" / "palu_fx"))


# --------------------------------------------------------------------------------------
# Austen corpus


def _austen_candidates(extra: Sequence[str | Path]) -> list[Path]:
    roots: list[Path] = [Path(p) for p in extra]
    if os.environ.get("PALU_FX_AUSTEN_DIR"):
        roots.append(Path(os.environ["PALU_FX_AUSTEN_DIR"]))
    for var in ("R_LIBS", "R_LIBS_USER", "R_LIBS_SITE"):
        roots += [Path(p) for p in os.environ.get(var, "").split(os.pathsep) if p]
    roots += [Path(p) for p in _R_LIBRARY_DIRS]
    roots.append(default_cache_dir() / _AUSTEN_DEB)
    out = []
    for root in roots:
        # Accept an R library dir, an extracted .deb root, or the data file's own directory.
        out += [
            root / _AUSTEN_REL,
            root / "usr" / "lib" / "R" / "site-library" / _AUSTEN_REL,
            root / "Rdata.rdx",
            root / "data" / "Rdata.rdx",
        ]
    return out


def find_austen_data(search: Sequence[str | Path] = ()) -> Path | None:
    """Path of the corpus's ``Rdata.rdx`` index (the ``.rdb`` sits next to it), or None."""
    for path in _austen_candidates(search):
        if path.is_file() and path.with_suffix(".rdb").is_file():
            return path
    return None


def fetch_austen_deb(dest: str | Path | None = None) -> Path:
    """Download the Debian package with apt (no root needed) and extract it into ``dest``.

    Returns the extracted root. Raises :class:`CorpusNotFoundError` when apt is unavailable
    or the download fails.
    """
    dest = Path(dest) if dest is not None else default_cache_dir() / _AUSTEN_DEB
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise CorpusNotFoundError(_AUSTEN_HELP + " (apt-get/dpkg-deb are not available here)")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", _AUSTEN_DEB], cwd=dest, check=True, capture_output=True, timeout=300)
        debs = sorted(dest.glob(f"{_AUSTEN_DEB}_*.deb"))
        if not debs:
            raise CorpusNotFoundError(_AUSTEN_HELP + " (apt-get download produced no .deb)")
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(dest)], check=True, capture_output=True, timeout=300)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        detail = getattr(err, "stderr", b"") or b""
        raise CorpusNotFoundError(
            _AUSTEN_HELP + f" (download failed: {detail.decode(errors='replace').strip()[:300]})"
        ) from err
    return dest


def _read_rdb_object(rdb: bytes, offset: int, length: int) -> Any:
    import rdata

    # An R lazy-load database entry: 4-byte big-endian uncompressed size, then a zlib
    # stream holding one serialized R object (the .rdx index gives offset and length).
    blob = rdb[offset : offset + length]
    (size,) = struct.unpack(">I", blob[:4])
    payload = zlib.decompress(blob[4:])
    if len(payload) != size:
        raise ValueError(f"corrupt R data entry at offset {offset}: {len(payload)} != {size} bytes")
    return rdata.conversion.convert(rdata.parser.parse_data(payload, extension=".rds"))


def austen_books(
    books: Sequence[str] | None = None,
    *,
    search: Sequence[str | Path] = (),
    download: bool = False,
) -> dict[str, str]:
    """The Austen novels as ``{book: text}``; lines joined with newlines, as in the source.

    Args:
        books: subset of :data:`AUSTEN_BOOKS` (default: all six).
        search: extra directories to look in before the standard R libraries and the cache.
        download: when not found, fetch the Debian package into the cache with apt.
    """
    try:
        import rdata  # noqa: F401
    except ImportError as err:
        raise CorpusNotFoundError(
            "reading the Austen corpus needs the `rdata` package: pip install rdata "
            "(or pip install 'palu-fx[eval]')"
        ) from err
    wanted = list(AUSTEN_BOOKS if books is None else books)
    unknown = [b for b in wanted if b not in AUSTEN_BOOKS]
    if unknown:
        raise ValueError(f"unknown Austen books {unknown}; known: {list(AUSTEN_BOOKS)}")
    index_path = find_austen_data(search)
    if index_path is None and download:
        fetch_austen_deb()
        index_path = find_austen_data(search)
    if index_path is None:
        raise CorpusNotFoundError(_AUSTEN_HELP)

    import rdata

    index = rdata.read_rds(index_path)
    variables = {str(k): v for k, v in index["variables"].items()}
    rdb = index_path.with_suffix(".rdb").read_bytes()
    out: dict[str, str] = {}
    for book in wanted:
        if book not in variables:
            raise CorpusNotFoundError(f"{index_path} has no object {book!r}; found {sorted(variables)}")
        offset, length = (int(x) for x in variables[book])
        lines = _read_rdb_object(rdb, offset, length)
        out[book] = "\n".join(str(line) for line in lines)
    return out


# --------------------------------------------------------------------------------------
# Other sources


def read_text_files(paths: Iterable[str | Path], encoding: str = "utf-8") -> str:
    """Concatenate local text files (separated by a blank line); clear error when missing."""
    texts = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise CorpusNotFoundError(f"text file {path} does not exist")
        texts.append(path.read_text(encoding=encoding))
    if not texts:
        raise ValueError("read_text_files: no paths given")
    return "\n\n".join(texts)


# (dataset name, config, text column, how documents are joined)
_HF_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text", ""),
    "c4": ("allenai/c4", "en", "text", "\n\n"),
}


def hf_text(name: str, split: str = "test", max_documents: int | None = None) -> str:
    """WikiText-2 (``"wikitext2"``) or C4 (``"c4"``) through ``datasets``; needs the hub.

    WikiText-2 lines are joined as stored (the usual perplexity convention, lines keep
    their own newlines); C4 (streamed: the full corpus is terabytes) joins ``max_documents``
    documents (default 1000) with blank lines. C4 has no ``test`` split: use ``validation``.
    """
    if name not in _HF_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(_HF_DATASETS)}")
    try:
        import datasets
    except ImportError as err:
        raise CorpusNotFoundError(
            f"{name} needs the `datasets` package and a reachable Hugging Face hub: pip install "
            "datasets; offline, use the Austen corpus or local text files instead"
        ) from err
    path, config, column, sep = _HF_DATASETS[name]
    try:
        if name == "c4":
            stream = datasets.load_dataset(path, config, split=split, streaming=True)
            docs = [row[column] for _, row in zip(range(max_documents or 1000), stream)]
        else:
            ds = datasets.load_dataset(path, config, split=split)
            docs = ds[column][: max_documents] if max_documents else ds[column]
    except Exception as err:  # network, auth, missing split: all mean "not available here"
        raise CorpusNotFoundError(
            f"could not load {name} ({path}/{config}, split {split!r}) through datasets: {err}. "
            "Offline, use the Austen corpus or local text files"
        ) from err
    return sep.join(docs)


# --------------------------------------------------------------------------------------
# Tokens and windows


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids ``[N]`` (int64) of ``text``, without special tokens (windows add BOS)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(
    ids: torch.Tensor,
    window: int = 1024,
    num_windows: int | None = None,
    bos_id: int | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Non-overlapping windows ``[N, window (+1 with BOS)]`` of a token stream ``[T]``.

    Each window holds ``window`` consecutive text tokens starting at ``offset``; with
    ``bos_id`` a BOS token is put in front of every window, so every text token of the
    window is predicted (the first from BOS alone) and windows are independent documents
    to the model. ``num_windows=None`` takes every full window; asking for more windows
    than the stream holds raises ValueError (silently evaluating less text would make
    numbers incomparable).
    """
    if window < 1:
        raise ValueError(f"window={window} must be positive")
    ids = ids.reshape(-1)[offset:]
    available = ids.numel() // window
    n = available if num_windows is None else num_windows
    if n > available or n < 1:
        raise ValueError(
            f"asked for {n} windows of {window} tokens but the text has {ids.numel()} tokens "
            f"after offset {offset} ({available} windows)"
        )
    out = ids[: n * window].reshape(n, window)
    if bos_id is not None:
        out = torch.cat([torch.full((n, 1), bos_id, dtype=out.dtype), out], dim=1)
    return out


@dataclass(frozen=True)
class TextSplit:
    """Disjoint token windows: ``calibration [Nc, Tc]`` and ``evaluation [Ne, Te]``."""

    calibration: torch.Tensor
    evaluation: torch.Tensor
    calibration_source: str
    evaluation_source: str


def austen_split(
    tokenizer: Any,
    *,
    eval_book: str = "prideprejudice",
    calib_book: str = "emma",
    eval_windows: int = 16,
    eval_window: int = 1024,
    calib_windows: int = 64,
    calib_window: int = 512,
    bos: bool = True,
    books: dict[str, str] | None = None,
) -> TextSplit:
    """Evaluation on the start of ``eval_book``, calibration on the start of ``calib_book``.

    Defaults reproduce the reference setting of issue 6: the first 16 x 1024 tokens of
    *Pride and Prejudice* (BOS first in each window) and 64 x 512 tokens of *Emma*.
    """
    if eval_book == calib_book:
        raise ValueError(
            f"eval_book and calib_book are both {eval_book!r}: calibration must not see the evaluation text"
        )
    books = books if books is not None else austen_books([eval_book, calib_book])
    bos_id = getattr(tokenizer, "bos_token_id", None) if bos else None
    ev = token_windows(tokenize(tokenizer, books[eval_book]), eval_window, eval_windows, bos_id)
    cal = token_windows(tokenize(tokenizer, books[calib_book]), calib_window, calib_windows, bos_id)
    return TextSplit(
        calibration=cal,
        evaluation=ev,
        calibration_source=f"austen:{calib_book}",
        evaluation_source=f"austen:{eval_book}",
    )
