"""Text loaders and windows: shapes, disjoint splits, clear errors for missing corpora."""
import gzip
import struct
import sys
import zlib

import numpy as np
import pytest
import torch

from palu_fx import data
from palu_fx.data import CorpusNotFoundError, austen_books, austen_split, read_text_files, token_windows


def write_fake_rdata(root, books: dict[str, list[str]]) -> None:
    """An R lazy-load database (``Rdata.rdx`` + ``.rdb``) holding character vectors."""
    rdata = pytest.importorskip("rdata")
    blob, variables = b"", {}
    for name, lines in books.items():
        tmp = root / f"{name}.rds"
        rdata.write_rds(tmp, np.array(lines))
        payload = gzip.decompress(tmp.read_bytes())
        entry = struct.pack(">I", len(payload)) + zlib.compress(payload)
        variables[name] = np.array([len(blob), len(entry)], dtype=np.int32)
        blob += entry
    (root / "Rdata.rdb").write_bytes(blob)
    rdata.write_rds(root / "Rdata.rdx", {"variables": variables, "references": {}, "compressed": True})


@pytest.fixture
def no_system_corpus(monkeypatch, tmp_path):
    """Hide any installed corpus: only explicitly passed directories are searched."""
    monkeypatch.setattr(data, "_R_LIBRARY_DIRS", ())
    monkeypatch.setenv("PALU_FX_CACHE", str(tmp_path / "cache"))
    for var in ("PALU_FX_AUSTEN_DIR", "R_LIBS", "R_LIBS_USER", "R_LIBS_SITE"):
        monkeypatch.delenv(var, raising=False)


def test_reads_books_from_an_r_data_archive(tmp_path, no_system_corpus):
    write_fake_rdata(tmp_path, {"emma": ["EMMA", "", "By Jane Austen"], "persuasion": ["Persuasion", "x"]})
    books = austen_books(["emma", "persuasion"], search=[tmp_path])
    assert books == {"emma": "EMMA\n\nBy Jane Austen", "persuasion": "Persuasion\nx"}


def test_missing_corpus_says_how_to_install(no_system_corpus):
    with pytest.raises(CorpusNotFoundError, match="apt-get download r-cran-janeaustenr"):
        austen_books(["emma"])


def test_download_without_apt_is_a_clear_error(no_system_corpus, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(CorpusNotFoundError, match="apt-get/dpkg-deb are not available"):
        austen_books(["emma"], download=True)


def test_unknown_book_and_missing_object(tmp_path, no_system_corpus):
    with pytest.raises(ValueError, match="unknown Austen books"):
        austen_books(["ulysses"])
    write_fake_rdata(tmp_path, {"emma": ["EMMA"]})
    with pytest.raises(CorpusNotFoundError, match="persuasion"):
        austen_books(["persuasion"], search=[tmp_path])


def test_token_windows_shapes_bos_and_offsets():
    ids = torch.arange(100)
    w = token_windows(ids, window=10, num_windows=3, bos_id=-1)
    assert w.shape == (3, 11)
    assert w[:, 0].tolist() == [-1, -1, -1]
    assert w[1, 1:].tolist() == list(range(10, 20))  # non-overlapping, consecutive
    assert token_windows(ids, 10).shape == (10, 10)  # all full windows, no BOS
    assert token_windows(ids, 10, 2, offset=95 - 20)[0, 0].item() == 75
    with pytest.raises(ValueError, match="11 windows"):
        token_windows(ids, 9, 12)
    with pytest.raises(ValueError, match="positive"):
        token_windows(ids, 0)


class CharTokenizer:
    """One token per character; BOS = 0."""

    bos_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [ord(c) for c in text]}


def test_austen_split_is_disjoint_and_shaped():
    books = {"prideprejudice": "p" * 200, "emma": "e" * 300}
    split = austen_split(CharTokenizer(), eval_windows=4, eval_window=50, calib_windows=5, calib_window=60, books=books)
    assert split.evaluation.shape == (4, 51) and split.calibration.shape == (5, 61)
    assert set(split.evaluation[:, 1:].unique().tolist()) == {ord("p")}
    assert set(split.calibration[:, 1:].unique().tolist()) == {ord("e")}
    with pytest.raises(ValueError, match="must not see the evaluation text"):
        austen_split(CharTokenizer(), eval_book="emma", calib_book="emma", books=books)


def test_local_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    assert read_text_files([tmp_path / "a.txt", tmp_path / "b.txt"]) == "alpha\n\nbeta"
    with pytest.raises(CorpusNotFoundError, match="does not exist"):
        read_text_files([tmp_path / "missing.txt"])


def test_hf_text_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(CorpusNotFoundError, match="pip install datasets"):
        data.hf_text("wikitext2")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.hf_text("pile")


def test_installed_corpus_when_present():
    if data.find_austen_data() is None:
        pytest.skip("r-cran-janeaustenr is not installed here")
    books = austen_books()
    assert len(books) == 6
    assert books["prideprejudice"].startswith("PRIDE AND PREJUDICE")
    assert len(books["emma"]) > 800_000  # characters
