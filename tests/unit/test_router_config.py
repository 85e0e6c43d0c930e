"""Router flags, environment variables, contradictions, and limits resolved from the model."""

from __future__ import annotations

import pytest
from text_generation_router.config import (
    ConfigError,
    RouterArgs,
    parse_args,
    resolve_limits,
    resolve_sequence_limits,
    tokenizer_path,
)


def test_defaults_follow_tgi_and_tgis():
    args = parse_args([], env={})
    assert (args.grpc_port, args.port, args.hostname) == (8033, 3000, "0.0.0.0")
    assert args.shard_uds_path == "/tmp/text-generation-server/shard"
    assert args.max_concurrent_requests == 128 and args.max_best_of == 2
    # TGIS's default: its clients send up to 6 stop sequences.
    assert args.max_stop_sequences == 6 and args.max_top_n_tokens == 5
    assert args.max_new_tokens == 1024 and args.default_max_new_tokens == 20
    assert args.waiting_served_ratio == 0.3 and args.max_waiting_tokens == 20
    assert args.max_input_tokens is None and args.max_total_tokens is None
    assert args.max_batch_prefill_tokens is None and args.max_batch_total_tokens is None
    assert args.max_batch_size is None and args.json_output is False
    assert args.graceful_shutdown_timeout == 10.0


def test_environment_variables_are_defaults_and_flags_override_them():
    env = {
        "GRPC_PORT": "9000",
        "PORT": "3100",
        "MAX_INPUT_LENGTH": "100",
        "MAX_TOTAL_TOKENS": "200",
        "JSON_OUTPUT": "true",
        "MAX_CONCURRENT_REQUESTS": "7",
        "SHARD_UDS_PATH": "/tmp/elsewhere",
    }
    args = parse_args([], env=env)
    assert (args.grpc_port, args.port, args.max_input_tokens, args.max_total_tokens) == (9000, 3100, 100, 200)
    assert args.json_output is True and args.max_concurrent_requests == 7
    assert args.shard_uds_path == "/tmp/elsewhere"
    args = parse_args(["--grpc-port", "9100", "--json-output", "false", "--max-input-tokens", "50"], env=env)
    assert args.grpc_port == 9100 and args.json_output is False and args.max_input_tokens == 50
    assert parse_args(["--json-output"], env={}).json_output is True


def test_a_malformed_environment_variable_names_the_variable():
    with pytest.raises(ConfigError, match="MAX_TOTAL_TOKENS='lots'"):
        parse_args([], env={"MAX_TOTAL_TOKENS": "lots"})
    with pytest.raises(ConfigError, match="JSON_OUTPUT"):
        parse_args([], env={"JSON_OUTPUT": "maybe"})


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--max-input-tokens", "100", "--max-total-tokens", "100"], ["--max-input-tokens (100)", "--max-total-tokens (100)"]),
        (["--max-total-tokens", "100", "--max-batch-total-tokens", "50"], ["--max-batch-total-tokens (50)", "--max-total-tokens (100)"]),
        (["--max-batch-prefill-tokens", "100", "--max-batch-total-tokens", "50"], ["--max-batch-prefill-tokens (100)"]),
        (["--max-new-tokens", "10", "--default-max-new-tokens", "20"], ["--default-max-new-tokens (20)", "--max-new-tokens (10)"]),
        (["--tokenizer", "/nonexistent/tok"], ["--tokenizer /nonexistent/tok", "not a directory"]),
    ],
)
def test_contradictory_flags_are_refused_with_a_message_naming_them(argv, words):
    with pytest.raises(ConfigError) as err:
        parse_args(argv, env={})
    for word in words:
        assert word in str(err.value)


def test_malformed_flags_exit_2_via_argparse(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--grpc-port", "http"], env={})
    assert exit_info.value.code == 2
    assert "--grpc-port" in capsys.readouterr().err


def test_tokenizer_defaults_to_a_local_model_directory(tmp_path):
    assert tokenizer_path(RouterArgs(model_id=str(tmp_path))) == tmp_path
    assert tokenizer_path(RouterArgs(tokenizer=str(tmp_path), model_id="org/name")) == tmp_path
    with pytest.raises(ConfigError, match="--tokenizer"):
        tokenizer_path(RouterArgs(model_id="org/not-a-directory"))


def test_sequence_limits_default_from_the_model_context_capped_at_4096():
    assert resolve_sequence_limits(RouterArgs(), 256) == (255, 256, 305)
    assert resolve_sequence_limits(RouterArgs(), 32768) == (4095, 4096, 4145)
    assert resolve_sequence_limits(RouterArgs(max_input_tokens=100), 256) == (100, 256, 150)
    assert resolve_sequence_limits(RouterArgs(max_total_tokens=64), 256) == (63, 64, 113)
    assert resolve_sequence_limits(RouterArgs(max_input_tokens=5000), 8192) == (5000, 5001, 5050)


def test_sequence_limits_beyond_the_model_are_refused():
    with pytest.raises(ConfigError, match=r"--max-total-tokens \(512\) exceeds the model's max_position_embeddings \(256\)"):
        resolve_sequence_limits(RouterArgs(max_total_tokens=512), 256)
    with pytest.raises(ConfigError, match="--max-input-tokens"):
        resolve_sequence_limits(RouterArgs(max_input_tokens=256), 256)


def _limits(args: RouterArgs, capacity: int):
    return resolve_limits(
        args, max_input_tokens=255, max_total_tokens=256, max_batch_prefill_tokens=305,
        supported_total_tokens=capacity, block_size=16,
    )


def test_batch_token_budget_defaults_to_the_warmup_capacity():
    limits = _limits(RouterArgs(), 10_000)
    assert limits.max_batch_total_tokens == 10_000 and limits.block_size == 16
    assert _limits(RouterArgs(max_batch_total_tokens=2000), 10_000).max_batch_total_tokens == 2000


def test_batch_token_budget_must_fit_the_cache_and_one_maximal_request():
    with pytest.raises(ConfigError, match=r"exceeds the KV cache capacity .* \(1000 tokens\)"):
        _limits(RouterArgs(max_batch_total_tokens=2000), 1000)
    with pytest.raises(ConfigError, match="below --max-total-tokens"):
        _limits(RouterArgs(), 200)
