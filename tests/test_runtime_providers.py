"""Execution providers: GPU options as a GPU user needs them, and a plain fallback where there is none."""
from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort
import pytest

from dpstack.policy import bench_latency
from dpstack.runtime.package import (RUN_DIR, SessionOptions, load_package, missing_providers, provider_options)
from runtime_tiny_package import TP, A, C, write_tiny_package

NO_CUDA = "CUDAExecutionProvider" not in ort.get_available_providers()
NO_TENSORRT = "TensorrtExecutionProvider" not in ort.get_available_providers()


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    return write_tiny_package(tmp_path / "tiny")


@pytest.mark.skipif(not NO_CUDA, reason="this onnxruntime has CUDA: nothing to fall back from")
def test_a_requested_gpu_provider_that_is_absent_falls_back_to_the_cpu_with_one_warning(tiny: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="dpstack.runtime.package"):
        package = load_package(tiny, options=SessionOptions(providers=("TensorrtExecutionProvider", "CUDAExecutionProvider")))
    assert package.providers == ("CPUExecutionProvider",)
    (record,) = caplog.records
    assert "TensorrtExecutionProvider, CUDAExecutionProvider are not available" in record.message
    assert "dpstack[gpu]" in record.message and "runs on CPUExecutionProvider" in record.message
    assert not (tiny / RUN_DIR).exists()  # no engine cache made for a provider that is not there


def test_the_preferred_order_on_a_cpu_machine_says_nothing(tiny: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="dpstack.runtime.package"):
        load_package(tiny)
    assert caplog.records == []


def test_tensorrt_gets_fp16_an_engine_cache_and_a_batch_profile_from_the_manifest(tmp_path: Path) -> None:
    shapes = {"x": (TP, A), "t": (TP,), "cond": (C,)}
    o = provider_options("TensorrtExecutionProvider", SessionOptions(max_batch=16, opt_batch=4), tmp_path, shapes)
    assert o["trt_fp16_enable"] == "True" and o["trt_engine_cache_enable"] == "True"
    assert o["trt_engine_cache_path"] == str(tmp_path) == o["trt_timing_cache_path"]
    assert o["trt_profile_min_shapes"] == f"x:1x{TP}x{A},t:1x{TP},cond:1x{C}"
    assert o["trt_profile_opt_shapes"] == f"x:4x{TP}x{A},t:4x{TP},cond:4x{C}"
    assert o["trt_profile_max_shapes"] == f"x:16x{TP}x{A},t:16x{TP},cond:16x{C}"
    assert provider_options("TensorrtExecutionProvider", SessionOptions(trt_fp16=False), None)["trt_fp16_enable"] == "False"
    assert provider_options("CUDAExecutionProvider", SessionOptions(device_id=1), None)["device_id"] == "1"
    assert provider_options("CPUExecutionProvider", SessionOptions(), None) == {}


def test_missing_providers_names_only_what_is_missing() -> None:
    assert missing_providers(["CPUExecutionProvider"], ["CPUExecutionProvider"]) is None
    why = missing_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"])
    assert why.startswith("CUDAExecutionProvider is not available") and "dpstack[gpu]" in why


@pytest.mark.skipif(not (NO_CUDA and NO_TENSORRT), reason="this onnxruntime has a GPU provider")
def test_bench_latency_says_plainly_which_gpu_backends_are_absent(tiny: Path, tmp_path: Path, capsys) -> None:
    rc = bench_latency.main(["--package", str(tiny), "--backends", "cuda,tensorrt", "--out", str(tmp_path / "l.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("dpstack bench: backend cuda skipped: CUDAExecutionProvider is not available")
    assert lines[1].startswith("dpstack bench: backend tensorrt skipped: TensorrtExecutionProvider is not available")
    assert lines[2] == "dpstack bench: no backend left to time"
    assert not (tmp_path / "l.json").exists()
