"""Session fixtures: tiny checkpoints and their exported artifacts, built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import models  # noqa: E402

#: Max |Δlogit| between the runtime and the independent transformers reference, per precision.
PARITY_ATOL = {"fp32": 1e-4}


def _export(src: Path, out: Path, **kw) -> Path:
    from memrerank.export import export_model

    return export_model(str(src), out, log=lambda m: None, **kw)


@pytest.fixture(scope="session")
def qwen_ckpt(tmp_path_factory) -> Path:
    return models.make_qwen3(tmp_path_factory.mktemp("ckpt") / "qwen3-tiny")


@pytest.fixture(scope="session")
def qwen_artifact(tmp_path_factory, qwen_ckpt) -> Path:
    """The traced graph (a decoder's default is the fused one: ``fused_artifact`` in test_fused.py)."""
    return _export(qwen_ckpt, tmp_path_factory.mktemp("art") / "qwen3", graph="traced")


@pytest.fixture(scope="session")
def qwen_short_artifact(tmp_path_factory, qwen_ckpt) -> Path:
    """max_length small enough that long documents are truncated."""
    return _export(qwen_ckpt, tmp_path_factory.mktemp("art") / "qwen3-short", max_length=128, graph="traced")


@pytest.fixture(scope="session")
def qwen_seqcls_ckpt(tmp_path_factory) -> Path:
    return models.make_qwen3(tmp_path_factory.mktemp("ckpt") / "qwen3-seq-cls", seq_cls=True, seed=1)


@pytest.fixture(scope="session")
def qwen_seqcls_artifact(tmp_path_factory, qwen_seqcls_ckpt) -> Path:
    return _export(qwen_seqcls_ckpt, tmp_path_factory.mktemp("art") / "qwen3-seq-cls")


@pytest.fixture(scope="session")
def bert_ckpt(tmp_path_factory) -> Path:
    return models.make_bert(tmp_path_factory.mktemp("ckpt") / "bert-tiny")


@pytest.fixture(scope="session")
def bert_artifact(tmp_path_factory, bert_ckpt) -> Path:
    return _export(bert_ckpt, tmp_path_factory.mktemp("art") / "bert", max_length=64)


@pytest.fixture(scope="session")
def minilm_ckpt(tmp_path_factory) -> Path:
    return models.make_minilm_cross_encoder(tmp_path_factory.mktemp("ckpt") / "minilm")


@pytest.fixture(scope="session")
def minilm_artifact(tmp_path_factory, minilm_ckpt) -> Path:
    return _export(minilm_ckpt, tmp_path_factory.mktemp("art") / "minilm")


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(models.qwen_tokenizer_dir() / "tokenizer.json"))


def _has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def _has_gpu() -> bool:
    try:
        from memrerank.runtime.backends.cuda import CudaRuntime

        CudaRuntime.load()
        return True
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` / `tensorrt` tests, with the reason, where the hardware or package is missing."""
    no_trt = None if _has_tensorrt() else pytest.mark.skip(reason="TensorRT is not installed (NVIDIA's index)")
    no_gpu = None if _has_gpu() else pytest.mark.skip(reason="no NVIDIA GPU / CUDA runtime on this machine")
    for item in items:
        if "tensorrt" in item.keywords and no_trt:
            item.add_marker(no_trt)
        if "gpu" in item.keywords and no_gpu:
            item.add_marker(no_gpu)
