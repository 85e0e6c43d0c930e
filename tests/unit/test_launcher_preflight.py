"""The launcher refuses quantization flags that do not fit the checkpoint before any shard starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gptq_checkpoint import write_gptq_checkpoint
from text_generation_launcher.args import parse_args
from text_generation_launcher.cli import run
from text_generation_launcher.launch import Commands
from text_generation_launcher.preflight import PreflightError, check_quantization


@pytest.fixture(scope="module")
def gptq_checkpoint(tmp_path_factory, tiny_llama) -> Path:
    quantized, _ = write_gptq_checkpoint(tiny_llama, tmp_path_factory.mktemp("pre") / "gptq")
    return quantized


@pytest.fixture(scope="module")
def legacy_gptq_checkpoint(tmp_path_factory, tiny_llama) -> Path:
    quantized, _ = write_gptq_checkpoint(
        tiny_llama, tmp_path_factory.mktemp("pre") / "legacy", legacy_config=True
    )
    return quantized


def args(*flags: str):
    return parse_args(list(flags), env={})


def test_gptq_flag_on_a_float_checkpoint_is_refused(tiny_llama):
    with pytest.raises(PreflightError, match="--quantize gptq needs a GPTQ checkpoint"):
        check_quantization(args("--quantize", "gptq"), tiny_llama)


@pytest.mark.parametrize("flag", ["bitsandbytes", "bitsandbytes-nf4"])
def test_another_method_on_a_gptq_checkpoint_is_refused(gptq_checkpoint, flag):
    with pytest.raises(PreflightError, match="gptq"):
        check_quantization(args("--quantize", flag), gptq_checkpoint)


def test_dtype_with_a_detected_gptq_checkpoint_is_refused(gptq_checkpoint):
    with pytest.raises(PreflightError, match="--dtype float32 cannot be combined with a GPTQ checkpoint"):
        check_quantization(args("--dtype", "float32"), gptq_checkpoint)


def test_gptq_checkpoint_without_the_flag_is_served_as_gptq_and_logged(gptq_checkpoint, capfd):
    from text_generation_server.utils.log import setup_logging

    setup_logging("launcher")
    assert check_quantization(args(), gptq_checkpoint) == "gptq"
    assert "serving it as --quantize gptq" in capfd.readouterr().err


def test_legacy_quantize_config_json_is_read(legacy_gptq_checkpoint):
    assert "quantization_config" not in json.loads((legacy_gptq_checkpoint / "config.json").read_text())
    assert check_quantization(args("--quantize", "gptq"), legacy_gptq_checkpoint) == "gptq"


def test_matching_flags_pass(gptq_checkpoint, tiny_llama):
    assert check_quantization(args("--quantize", "gptq"), gptq_checkpoint) == "gptq"
    assert check_quantization(args(), tiny_llama) == "unquantized"


def test_launcher_exits_1_before_spawning_anything(tiny_llama, tmp_path, capfd):
    marker = tmp_path / "spawned"
    spawn = ("sh", "-c", f"touch {marker}")
    code = run(["--model-id", str(tiny_llama), "--quantize", "gptq"], commands=Commands(spawn, spawn))
    err = capfd.readouterr().err
    assert code == 1
    assert "Cannot start" in err and "needs a GPTQ checkpoint" in err
    assert not marker.exists()


def test_a_model_without_tokenizer_files_is_refused_before_any_shard(tiny_llama, tmp_path):
    import shutil

    from text_generation_launcher.preflight import check_tokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    check_tokenizer(model)  # the tiny model has tokenizer.json
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json"):
        (model / name).unlink(missing_ok=True)
    with pytest.raises(PreflightError, match="has no tokenizer: expected one of tokenizer.json"):
        check_tokenizer(model)
