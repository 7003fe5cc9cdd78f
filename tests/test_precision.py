import logging

import pytest
import torch

from pair_vit import precision


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv("PAIR_VIT_BF16", raising=False)
    precision._cpu_has_native_bf16.cache_clear()
    yield
    precision._cpu_has_native_bf16.cache_clear()


def _cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse2 {flags}\n\n"
                    f"processor\t: 1\nflags\t\t: fpu sse2 {flags}\n")
    return str(path)


@pytest.mark.parametrize("flags, native", [("avx2 avx512f avx512_bf16", True), ("avx2 amx_bf16 amx_tile", True),
                                           ("avx2 avx512f avx512bw", False), ("avx2", False)])
def test_cpu_flags_decide(tmp_path, flags, native):
    assert precision._cpu_has_native_bf16(_cpuinfo(tmp_path, flags)) is native


def test_unreadable_cpuinfo_means_float32(tmp_path):
    assert precision._cpu_has_native_bf16(str(tmp_path / "missing")) is False


def test_environment_overrides_detection(monkeypatch):
    monkeypatch.setenv("PAIR_VIT_BF16", "1")
    assert precision.use_bf16("cpu", True) is True
    assert precision.use_bf16("cpu", False) is False  # --no-amp always wins
    monkeypatch.setenv("PAIR_VIT_BF16", "0")
    assert precision.use_bf16("cpu", True) is False


def test_autocast_follows_the_resolution(monkeypatch):
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    monkeypatch.setenv("PAIR_VIT_BF16", "1")
    with precision.autocast(torch.device("cpu"), True):
        assert layer(x).dtype == torch.bfloat16
    monkeypatch.setenv("PAIR_VIT_BF16", "0")
    with precision.autocast("cpu", True):
        assert layer(x).dtype == torch.float32


def test_fallback_is_logged(monkeypatch, caplog):
    monkeypatch.setenv("PAIR_VIT_BF16", "0")
    precision._log_fallback.cache_clear()
    with caplog.at_level(logging.INFO, logger="pair_vit.precision"):
        precision.use_bf16("cpu", True)
    assert "bf16 autocast off on cpu" in caplog.text
