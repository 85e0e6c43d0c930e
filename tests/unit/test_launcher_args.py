"""Launcher flags: TGI names and defaults, environment variables, and contradictions refused before start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from text_generation_launcher import args as launcher_args
from text_generation_launcher.args import (
    ArgsError,
    parse_args,
    router_limit_args,
    visible_cuda_devices,
)
from text_generation_launcher.cli import run

LAUNCHER = Path(sys.executable).parent / "text-generation-launcher"


def parse(argv: list[str], env: dict[str, str] | None = None, gpus: int = 0):
    return parse_args(argv, env=env or {}, cuda_device_count=lambda: gpus)


def refused(argv: list[str], env: dict[str, str] | None = None, gpus: int = 0) -> str:
    with pytest.raises(ArgsError) as err:
        parse(argv, env, gpus)
    return str(err.value)


def test_defaults_match_tgi_and_tgis():
    a = parse([])
    assert a.model_id is None and a.num_shard == 1 and a.sharded is None
    assert (a.grpc_port, a.port, a.hostname) == (8033, 3000, "0.0.0.0")
    assert a.shard_uds_path == "/tmp/text-generation-server/shard"
    assert (a.master_addr, a.master_port) == ("localhost", 29500)
    assert a.quantize is None and a.dtype is None and a.trust_remote_code is False and a.json_output is False
    assert a.served_model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert router_limit_args(a) == []  # the router's own defaults apply


@pytest.mark.parametrize(
    "env, field, expected",
    [
        ({"MODEL_ID": "org/model"}, "model_id", "org/model"),
        ({"REVISION": "v2"}, "revision", "v2"),
        ({"NUM_SHARD": "2"}, "num_shard", 2),
        ({"SHARDED": "false"}, "sharded", False),
        ({"QUANTIZE": "bitsandbytes-nf4"}, "quantize", "bitsandbytes-nf4"),
        ({"DTYPE": "bfloat16"}, "dtype", "bfloat16"),
        ({"TRUST_REMOTE_CODE": "true"}, "trust_remote_code", True),
        ({"MAX_CONCURRENT_REQUESTS": "7"}, "max_concurrent_requests", 7),
        ({"MAX_BEST_OF": "3"}, "max_best_of", 3),
        ({"MAX_STOP_SEQUENCES": "6"}, "max_stop_sequences", 6),
        ({"MAX_TOP_N_TOKENS": "9"}, "max_top_n_tokens", 9),
        ({"MAX_INPUT_TOKENS": "100"}, "max_input_tokens", 100),
        ({"MAX_INPUT_LENGTH": "101"}, "max_input_tokens", 101),
        ({"MAX_TOTAL_TOKENS": "300"}, "max_total_tokens", 300),
        ({"WAITING_SERVED_RATIO": "0.5"}, "waiting_served_ratio", 0.5),
        ({"MAX_BATCH_PREFILL_TOKENS": "4096"}, "max_batch_prefill_tokens", 4096),
        ({"MAX_BATCH_TOTAL_TOKENS": "8192"}, "max_batch_total_tokens", 8192),
        ({"MAX_WAITING_TOKENS": "10"}, "max_waiting_tokens", 10),
        ({"MAX_NEW_TOKENS": "2048"}, "max_new_tokens", 2048),
        ({"PORT": "3001"}, "port", 3001),
        ({"GRPC_PORT": "8034"}, "grpc_port", 8034),
        ({"HOSTNAME": "127.0.0.1"}, "hostname", "127.0.0.1"),
        ({"SHARD_UDS_PATH": "/run/tgs"}, "shard_uds_path", "/run/tgs"),
        ({"MASTER_ADDR": "10.0.0.1"}, "master_addr", "10.0.0.1"),
        ({"MASTER_PORT": "29600"}, "master_port", 29600),
        ({"HUGGINGFACE_HUB_CACHE": "/data"}, "huggingface_hub_cache", "/data"),
        ({"JSON_OUTPUT": "1"}, "json_output", True),
        ({"OTLP_ENDPOINT": "http://otel:4317"}, "otlp_endpoint", "http://otel:4317"),
        ({"GRACEFUL_SHUTDOWN_TIMEOUT": "30"}, "graceful_shutdown_timeout", 30.0),
        ({"SHUTDOWN_TIMEOUT": "5"}, "shutdown_timeout", 5.0),
    ],
)
def test_every_flag_reads_its_environment_variable(env, field, expected):
    assert getattr(parse([], env), field) == expected


def test_a_flag_overrides_its_environment_variable():
    a = parse(["--num-shard", "1", "--model-id", "/flag"], {"NUM_SHARD": "2", "MODEL_ID": "/env"})
    assert (a.num_shard, a.model_id) == (1, "/flag")


@pytest.mark.parametrize("text, value", [("true", True), ("false", False), ("1", True), ("0", False), ("TRUE", True)])
def test_booleans_accept_true_false_1_0_as_flag_and_env(text, value):
    assert parse(["--json-output", text]).json_output is value
    assert parse([], {"JSON_OUTPUT": text}).json_output is value
    assert parse(["--trust-remote-code", text]).trust_remote_code is value


def test_switches_may_be_given_bare():
    a = parse(["--json-output", "--trust-remote-code"])
    assert a.json_output is True and a.trust_remote_code is True


def test_limits_the_user_set_are_passed_to_the_router_and_only_those():
    a = parse(["--max-total-tokens", "300", "--default-include-stop-sequence", "false"], {"MAX_INPUT_LENGTH": "100"})
    assert router_limit_args(a) == [
        "--max-input-tokens", "100", "--max-total-tokens", "300", "--default-include-stop-sequence", "false",
    ]


# ---- sharding ------------------------------------------------------------------------------------------


def test_sharded_true_with_one_shard_is_a_contradiction():
    message = refused(["--sharded", "true", "--num-shard", "1"])
    assert "--sharded true" in message and "--num-shard 1" in message


def test_sharded_false_with_two_shards_is_a_contradiction():
    message = refused(["--sharded", "false", "--num-shard", "2"])
    assert "--sharded false" in message and "--num-shard 2" in message


def test_sharded_true_without_num_shard_on_a_cpu_host_asks_for_num_shard():
    assert "no CUDA device visible; pass --num-shard N" in refused(["--sharded", "true"], gpus=0)


def test_sharded_true_without_num_shard_uses_every_visible_gpu():
    assert parse(["--sharded", "true"], gpus=4).num_shard == 4
    assert "only 1 CUDA device visible" in refused(["--sharded", "true"], gpus=1)


@pytest.mark.parametrize("n", ["0", "-2"])
def test_num_shard_below_one_is_refused(n):
    assert f"--num-shard must be at least 1, got {n}" in refused(["--num-shard", n])


def test_more_shards_than_gpus_is_refused_but_any_count_works_on_cpu():
    assert "--num-shard 3: only 2 CUDA device(s) visible" in refused(["--num-shard", "3"], gpus=2)
    assert parse(["--num-shard", "3"], gpus=0).num_shard == 3


def test_sharded_env_var_contradiction_is_refused_too():
    assert "--sharded true contradicts --num-shard 1" in refused([], {"SHARDED": "1", "NUM_SHARD": "1"})


# ---- other contradictions and bad values ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_dtype_with_gptq_is_refused(dtype):
    message = refused(["--quantize", "gptq", "--dtype", dtype])
    assert f"--dtype {dtype} cannot be combined with --quantize gptq" in message


def test_dtype_with_bitsandbytes_is_fine():
    assert parse(["--quantize", "bitsandbytes", "--dtype", "bfloat16"]).dtype == "bfloat16"


def test_max_input_tokens_must_be_below_max_total_tokens():
    message = refused(["--max-input-tokens", "512", "--max-total-tokens", "512"])
    assert "--max-input-tokens (512) must be < --max-total-tokens (512)" in message


def test_router_limit_contradictions_are_refused_before_start():
    # A prefill budget below the longest input is not one: longer prompts are prefilled in chunks.
    assert parse(["--max-input-tokens", "100", "--max-batch-prefill-tokens", "10"]).max_batch_prefill_tokens == 10
    assert "--default-max-new-tokens (20) must be <= --max-new-tokens (10)" in refused(["--max-new-tokens", "10"])


def test_same_port_for_http_and_grpc_is_refused():
    assert "--port and --grpc-port are both 9000" in refused(["--port", "9000", "--grpc-port", "9000"])


def test_master_port_equal_to_a_router_port_is_refused_when_sharded():
    assert "--master-port 8033" in refused(["--num-shard", "2", "--master-port", "8033"])


def test_bad_environment_value_names_the_variable():
    assert "environment variable NUM_SHARD='two'" in refused([], {"NUM_SHARD": "two"})
    assert "environment variable QUANTIZE='awq'" in refused([], {"QUANTIZE": "awq"})
    assert "environment variable JSON_OUTPUT='maybe'" in refused([], {"JSON_OUTPUT": "maybe"})


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--quantize", "awq"], "expected one of gptq, bitsandbytes, bitsandbytes-nf4, bitsandbytes-fp4; got 'awq'"),
        (["--dtype", "float64"], "expected one of float16, bfloat16, float32; got 'float64'"),
        (["--sharded", "maybe"], "expected true or false (or 1/0), got 'maybe'"),
        (["--port", "70000"], "expected a port number 1-65535, got '70000'"),
        (["--max-total-tokens", "0"], "expected an integer >= 1, got '0'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_malformed_flags_exit_2_with_what_is_allowed(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


# ---- the CLI ------------------------------------------------------------------------------------------------


def test_contradiction_exits_2_with_one_line_before_anything_starts(capsys, monkeypatch):
    def must_not_resolve(*a, **k):
        raise AssertionError("model resolved despite bad flags")

    monkeypatch.setattr("text_generation_server.model_source.resolve_model", must_not_resolve)
    monkeypatch.setattr(launcher_args, "visible_cuda_devices", lambda: 0)
    assert run(["--sharded", "true", "--num-shard", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("text-generation-launcher: error: --sharded true contradicts")


def test_console_script_refuses_contradiction_with_exit_2():
    out = subprocess.run([str(LAUNCHER), "--sharded", "false", "--num-shard", "2"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert "--sharded false contradicts --num-shard 2" in out.stderr
    assert "Traceback" not in out.stderr


def test_help_lists_every_flag_and_its_environment_variable():
    import os

    # wide enough that no help line wraps inside a value
    env = {**os.environ, "COLUMNS": "400"}
    out = subprocess.run([str(LAUNCHER), "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0
    for flag in launcher_args._FLAGS:
        for name in flag.names:
            assert name in out.stdout, name
        for env in flag.env:
            assert env in out.stdout, env
    for value in ("gptq|bitsandbytes|bitsandbytes-nf4|bitsandbytes-fp4", "(default: 8033)", "(default: 3000)"):
        assert value in out.stdout


# ---- device detection ---------------------------------------------------------------------------------------


def test_no_gpu_driver_means_no_cuda_device_whatever_cuda_visible_devices_says(monkeypatch):
    monkeypatch.setattr(launcher_args, "_GPU_DRIVER_PATHS", ("/nonexistent/nvidiactl",))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert visible_cuda_devices() == 0


@pytest.mark.parametrize("visible, count", [("0,1", 2), ("3", 1), ("", 0), ("-1", 0)])
def test_cuda_visible_devices_is_counted_when_a_driver_is_present(monkeypatch, tmp_path, visible, count):
    monkeypatch.setattr(launcher_args, "_GPU_DRIVER_PATHS", (str(tmp_path),))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert visible_cuda_devices() == count


def test_the_quantize_choices_are_the_registrys_and_the_dtype_rule_is_its_own():
    """--quantize lists what the shards' registry serves; --dtype refusals come from the method."""
    from text_generation_launcher.args import QUANTIZE_CHOICES
    from text_generation_server.layers.quant.registry import (
        dtype_flag_refusal,
        quantizes_at_load,
        supported_quantizations,
    )

    assert sorted(QUANTIZE_CHOICES) == supported_quantizations()
    for name in QUANTIZE_CHOICES:
        refusal = dtype_flag_refusal(name, "float16", f"--quantize {name}")
        assert (refusal is not None) == (name == "gptq"), (name, refusal)
        assert quantizes_at_load(name) == name.startswith("bitsandbytes")
    assert dtype_flag_refusal(None, "float16", "no flag") is None and not quantizes_at_load(None)


def test_tgis_environment_names_are_honoured_and_tgi_names_win_over_them():
    """A TGIS deployment's environment (MODEL_NAME, NUM_GPUS, DTYPE_STR, MAX_SEQUENCE_LENGTH) sets
    the same flags; it no longer serves the built-in model instead of MODEL_NAME."""
    args = parse([], {"MODEL_NAME": "org/served", "NUM_GPUS": "2", "DTYPE_STR": "bfloat16",
                      "MAX_SEQUENCE_LENGTH": "2048"})  # fmt: skip
    assert (args.model_id, args.num_shard, args.dtype, args.max_total_tokens) == ("org/served", 2, "bfloat16", 2048)
    args = parse([], {"MODEL_NAME": "org/tgis", "MODEL_ID": "org/tgi"})
    assert args.model_id == "org/tgi"
    assert "DTYPE_STR='half'" in refused([], {"DTYPE_STR": "half"})


def test_tgis_batch_weights_set_the_token_budgets_and_unhonourable_settings_are_refused():
    from text_generation_launcher.args import tgis_environment_notes

    args = parse([], {"MAX_BATCH_WEIGHT": "8192", "MAX_PREFILL_WEIGHT": "2048"})
    assert (args.max_batch_total_tokens, args.max_batch_prefill_tokens) == (8192, 2048)
    assert "OUTPUT_SPECIAL_TOKENS" in refused([], {"OUTPUT_SPECIAL_TOKENS": "true"})
    assert "PT2_COMPILE" in refused([], {"PT2_COMPILE": "true"})
    parse([], {"OUTPUT_SPECIAL_TOKENS": "false", "PT2_COMPILE": "false"})
    notes = tgis_environment_notes({"DEPLOYMENT_FRAMEWORK": "tgis_native", "FLASH_ATTENTION": "true"})
    assert [n.split("=")[0] for n in notes] == ["DEPLOYMENT_FRAMEWORK", "FLASH_ATTENTION"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--speculate", "17"], "--speculate 17: at most 16"),
        (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8"),
        (["--rope-scaling", "linear"], "config.json"),
        (["--rope-factor", "2"], "config.json"),
        (["--watermark-gamma", "0.5"], "watermarking"),
        (["--lora-adapters", "org/a"], "adapters"),
        (["--cuda-graphs", "1,2,4"], "CUDA graphs"),
    ],
)
def test_tgi_flags_for_features_this_server_lacks_are_refused_naming_why(argv, needle):
    assert needle in refused(argv)


def test_tgi_flags_from_real_manifests_are_accepted_and_honoured():
    from text_generation_launcher.launch import Commands, router_argv, router_env, shard_env

    args = parse(["--speculate", "0", "--cuda-graphs", "0", "--usage-stats", "off", "--validation-workers", "4",
                  "--enable-prefill-logprobs", "--disable-grammar-support", "--graceful-termination-timeout", "30",
                  "--disable-custom-kernels", "--api-key", "k3y", "--cors-allow-origin", "https://a.example",
                  "--max-client-batch-size", "8", "--max-best-of", "3"])  # fmt: skip
    assert args.shutdown_timeout == 30.0
    assert shard_env(args, 0, {})["CPU_KERNELS"] == "off"
    assert "CPU_KERNELS" not in shard_env(parse([]), 0, {})
    assert shard_env(parse(["--speculate", "3"]), 1, {})["SPECULATE"] == "3"
    assert shard_env(parse(["--prefix-caching", "false"]), 0, {})["PREFIX_CACHING"] == "false"
    commands = Commands(server=("server",), router=("router",))
    argv = router_argv(args, Path("/m"), commands)
    # the key travels in the router's environment, never on a command line (ps shows those)
    assert "k3y" not in " ".join(argv) and router_env(args, {"A": "1"}) == {"A": "1", "API_KEY": "k3y"}
    assert argv[argv.index("--cors-allow-origin") + 1] == "https://a.example"
    assert argv[argv.index("--max-client-batch-size") + 1] == "8"
    assert argv[argv.index("--max-best-of") + 1] == "3"
    assert parse([], {"USAGE_STATS": "no-stack"}).usage_stats == "no-stack"
