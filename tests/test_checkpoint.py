"""sdlearn.checkpoint: the file format (atomic, validated, never unpickled), loading a model from it, and the
ConfigMixin every config shares (JSON round trips, one wording for unknown fields and bad counts)."""

import hashlib
import json
import os

import pytest
import torch

from sdlearn import checkpoint
from sdlearn.checkpoint import (
    CheckpointError,
    ConfigMixin,
    atomic_write_bytes,
    checkpoint_paths,
    describe_mismatch,
    file_sha256,
    load_checkpoint,
    load_module_state,
    read_checkpoint_config,
    save_checkpoint,
    save_module,
    weights_path,
)
from sdlearn.checks import check_positive_int
from sdlearn.denoiser import DenoiserConfig
from sdlearn.metrics import ClassifierConfig
from sdlearn.text import TextEncoderConfig, TinyCLIPConfig
from sdlearn.vae import VAE, VAEConfig

TINY_VAE = VAEConfig(base_channels=8, channel_multipliers=(1, 2, 2), num_res_blocks=(0, 1, 1), norm_groups=4)


# ------------------------------------------------------------------------------------------------
# Checkpoint files


def test_save_load_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b/c": torch.arange(5), "scalar": torch.tensor(2.5), "bytes": torch.zeros(3, dtype=torch.uint8)}
    written = save_checkpoint(tmp_path / "ckpt", tensors, {"kind": "test", "step": 7, "nested": {"x": [1, 2]}})
    assert written == tmp_path / "ckpt.safetensors" and (tmp_path / "ckpt.json").is_file()
    document = json.loads((tmp_path / "ckpt.json").read_text())
    assert document["format_version"] == checkpoint.FORMAT_VERSION
    assert document["tensors"]["a"] == {"dtype": "float32", "shape": [3, 4]}
    for path in (tmp_path / "ckpt", tmp_path / "ckpt.safetensors", tmp_path / "ckpt.json"):
        loaded, config = load_checkpoint(path)
        assert config == {"kind": "test", "step": 7, "nested": {"x": [1, 2]}}
        assert loaded.keys() == tensors.keys()
        assert all(torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype for k in tensors)
    assert read_checkpoint_config(tmp_path / "ckpt")["step"] == 7
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_reserved_config_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(1)}, {"tensors": 1})


def test_checkpoint_paths():
    assert checkpoint_paths("d/x") == checkpoint_paths("d/x.json") == checkpoint_paths("d/x.safetensors")
    assert [p.name for p in checkpoint_paths("d/vae")] == ["vae.safetensors", "vae.json"]


def test_weights_path(tmp_path):
    assert weights_path("vae") == checkpoint.WEIGHTS_DIR / "vae.safetensors"
    assert weights_path("vae", tmp_path) == tmp_path / "vae.safetensors"  # a folder
    assert weights_path("vae", tmp_path / "mine.json") == tmp_path / "mine.safetensors"  # a file or its stem


def test_atomic_write_bytes_and_file_sha256(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new bytes")
    assert path.read_bytes() == b"new bytes" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    assert file_sha256(path) == hashlib.sha256(b"new bytes").hexdigest()


def test_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    old = {"w": torch.ones(4)}
    save_checkpoint(tmp_path / "ckpt", old, {"step": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("simulated power cut during the rename")

    monkeypatch.setattr(checkpoint.os, "replace", crash)  # dies after the temporary file is written
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path / "ckpt", {"w": torch.zeros(4)}, {"step": 2})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files left, old bytes kept
    tensors, config = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(tensors["w"], old["w"]) and config == {"step": 1}


def test_interrupted_write_midway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(4)}, {"step": 1})
    real_fsync = os.fsync

    def crash(fd):
        raise OSError("simulated crash before the data reached the disk")

    monkeypatch.setattr(checkpoint.os, "fsync", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path / "ckpt", {"w": torch.zeros(4)}, {"step": 2})
    monkeypatch.setattr(checkpoint.os, "fsync", real_fsync)
    tensors, config = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(tensors["w"], torch.ones(4)) and config == {"step": 1}


def test_save_interrupted_between_the_two_files_still_loads_one_consistent_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(4)}, {"step": 1})
    real_replace, calls = os.replace, []

    def replace_then_crash(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the .safetensors was renamed; crash before the .json is
            raise OSError("simulated crash between the two renames")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace_then_crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path / "ckpt", {"w": torch.zeros(4)}, {"step": 2})
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="another save"):
        tensors, config = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(tensors["w"], torch.zeros(4)) and config == {"step": 2}  # the new pair, consistent


def test_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="nothing.safetensors.*not found"):
        load_checkpoint(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="nothing.json.*not found"):
        read_checkpoint_config(tmp_path / "nothing")


def test_truncated_file_is_reported_with_its_name(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", {"w": torch.randn(100, 100)}, {})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"ckpt\.safetensors.*not a readable safetensors file"):
        load_checkpoint(path)


@pytest.mark.parametrize("garbage", [b"", b"hello, I am not a weights file\n", b"\xff" * 64])
def test_not_safetensors_is_reported_with_its_name(tmp_path, garbage):
    path = save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, {})
    path.write_bytes(garbage)
    with pytest.raises(CheckpointError, match=r"ckpt\.safetensors"):
        load_checkpoint(path)


def test_damaged_or_missing_json_falls_back_to_the_copy_in_the_weights_file(tmp_path):
    save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, {"step": 3})
    (tmp_path / "ckpt.json").write_text("{ not json")
    with pytest.warns(UserWarning, match="not valid JSON"):
        assert load_checkpoint(tmp_path / "ckpt")[1] == {"step": 3}
    (tmp_path / "ckpt.json").unlink()
    with pytest.warns(UserWarning, match="not found"):
        assert load_checkpoint(tmp_path / "ckpt")[1] == {"step": 3}


def test_foreign_safetensors_without_config_is_rejected(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="other.json.*not found"):
        load_checkpoint(tmp_path / "other")


def test_wrong_shapes_and_names_are_listed(tmp_path):
    small = VAE(VAEConfig(base_channels=8, num_res_blocks=1, norm_groups=4))
    path = save_checkpoint(tmp_path / "vae", small.state_dict(), {})
    tensors, _ = load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"vae\.safetensors.*wrong shape: decoder\.") as error:
        load_module_state(VAE(VAEConfig()), tensors, path)
    assert "expected [" in str(error.value)
    with pytest.raises(CheckpointError, match="missing: .*unexpected: "):
        load_module_state(VAE(TINY_VAE), tensors, path)


def test_describe_mismatch():
    assert describe_mismatch({"a": (1,)}, {"a": (1,)}) == "no difference"
    text = describe_mismatch({"a": (1,), "b": (2, 3)}, {"b": (2, 4), "c": (5,)})
    assert text == "missing: a; unexpected: c; wrong shape: b: expected [2, 3], found [2, 4]"


# ------------------------------------------------------------------------------------------------
# A model's files: save_module / load_module (through sdlearn.pretrained.load_vae)


def test_load_vae_errors_name_the_file(tmp_path):
    from sdlearn.pretrained import load_vae

    with pytest.raises(CheckpointError, match="vae.safetensors.*not found"):
        load_vae(tmp_path)
    save_checkpoint(tmp_path / "vae", {"w": torch.ones(1)}, {"kind": "denoiser", "model_config": {}})
    with pytest.raises(CheckpointError, match="'denoiser' model, not a 'vae'"):
        load_vae(tmp_path / "vae.safetensors")
    save_checkpoint(tmp_path / "vae", {"w": torch.ones(1)}, {"kind": "vae", "model_config": {"colour": 1}})
    with pytest.raises(CheckpointError, match=r"vae\.json.*no valid model_config: unknown VAEConfig fields"):
        load_vae(tmp_path)
    small = VAE(TINY_VAE)
    config = TINY_VAE.to_dict()
    config["base_channels"] = 16
    save_checkpoint(tmp_path / "vae", small.state_dict(), {"kind": "vae", "model_config": config})
    with pytest.raises(CheckpointError, match=r"vae\.safetensors.*does not match VAE's configuration: wrong shape"):
        load_vae(tmp_path)


def test_save_module_writes_kind_config_and_notes(tmp_path):
    from sdlearn.pretrained import load_vae

    torch.manual_seed(0)
    vae = VAE(TINY_VAE)
    save_module(vae, tmp_path / "vae", "vae", training={"steps": 3}, note="hi")
    info = read_checkpoint_config(tmp_path / "vae")
    assert info["kind"] == "vae" and info["note"] == "hi" and info["training"] == {"steps": 3}
    assert VAEConfig.from_dict(info["model_config"]) == TINY_VAE
    loaded = load_vae(tmp_path)
    assert loaded.training_info == {"steps": 3} and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vae.state_dict().values()))
    with pytest.raises(ValueError, match="dtype"):
        save_module(vae, tmp_path / "vae", "vae", dtype=torch.int8)


# ------------------------------------------------------------------------------------------------
# ConfigMixin: the five configs share to_dict / from_dict and one wording of their errors

CONFIGS = [
    VAEConfig(channel_multipliers=(1, 2, 2), num_res_blocks=(0, 1, 2), scaling_factor=0.5, kl_weight=1e-5),
    VAEConfig(num_res_blocks=2),
    DenoiserConfig(width=64, depth=3, prediction_type="v_prediction", cross_attn_ratio=1.0),
    TextEncoderConfig(width=32, depth=1, heads=2, mlp_ratio=3.0),
    TinyCLIPConfig(text=TextEncoderConfig(width=32, depth=1, heads=2), image_channels=(8, 16), embed_dim=16),
    ClassifierConfig(widths=(8, 16), feature_dim=32),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_every_config_round_trips_through_json(config):
    assert isinstance(config, ConfigMixin)
    d = config.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert "(" not in text  # tuples became lists, nested configs dicts: plain JSON
    again = type(config).from_dict(json.loads(text))
    assert again == config and type(again) is type(config)
    assert again.to_dict() == d
    assert type(config).from_dict(type(config)().to_dict()) == type(config)()  # the defaults too


def test_a_nested_config_is_written_as_a_dict():
    d = CONFIGS[4].to_dict()
    assert isinstance(d["text"], dict) and d["text"]["width"] == 32 and d["image_channels"] == [8, 16]
    assert isinstance(TinyCLIPConfig.from_dict(d).text, TextEncoderConfig)


@pytest.mark.parametrize("config_cls", [VAEConfig, DenoiserConfig, TextEncoderConfig, TinyCLIPConfig, ClassifierConfig])
def test_unknown_fields_are_refused_with_one_wording(config_cls):
    d = {**config_cls().to_dict(), "colour": 1, "bogus": 2}
    known = sorted(config_cls().to_dict())
    with pytest.raises(ValueError) as error:
        config_cls.from_dict(d)
    assert str(error.value) == f"unknown {config_cls.__name__} fields ['bogus', 'colour']; known fields: {known}"
    with pytest.raises(ValueError, match=f"{config_cls.__name__}.from_dict expects a dict"):
        config_cls.from_dict([1, 2])


@pytest.mark.parametrize(
    "config_cls, field",
    [(VAEConfig, "base_channels"), (DenoiserConfig, "depth"), (TextEncoderConfig, "width"), (TinyCLIPConfig, "embed_dim"),
     (ClassifierConfig, "feature_dim")],
)
@pytest.mark.parametrize("bad", [0, -3, 2.0, "8", True])
def test_counts_must_be_positive_integers_with_one_wording(config_cls, field, bad):
    with pytest.raises(ValueError, match=rf"^{config_cls.__name__}\.{field} must be a positive integer, got {bad!r}$"):
        config_cls(**{field: bad})


def test_vae_config_refuses_true_where_an_int_is_due():
    with pytest.raises(ValueError, match=r"VAEConfig\.in_channels must be a positive integer, got True"):
        VAEConfig(in_channels=True)
    with pytest.raises(ValueError, match=r"VAEConfig\.latent_channels must be a positive integer, got True"):
        VAEConfig.from_dict({"latent_channels": True})


def test_check_positive_int():
    check_positive_int(1, "n")
    check_positive_int(None, "n", allow_none=True)
    for bad in (0, -1, 1.5, True, "3", None):
        with pytest.raises(ValueError, match=r"^n must be a positive integer, got "):
            check_positive_int(bad, "n")
    with pytest.raises(ValueError, match="positive integer or None"):
        check_positive_int(0, "n", allow_none=True)


# ------------------------------------------------------------------------------------------------
# Atomic writes of several files, the embedded copy of a lost JSON, and the bounds of config sizes


def test_atomic_write_files_writes_all_or_nothing(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_bytes(b"old a")
    real_fsync, calls = os.fsync, []

    def fail_on_the_second_file(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", fail_on_the_second_file)
    with pytest.raises(OSError, match="No space"):
        checkpoint.atomic_write_files([(tmp_path / "a.txt", b"new a"), (tmp_path / "b.txt", b"new b")])
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"] and (tmp_path / "a.txt").read_bytes() == b"old a"
    assert checkpoint.atomic_write_files([(tmp_path / "a.txt", b"new a"), (tmp_path / "b.txt", b"new b")]) == [
        tmp_path / "a.txt", tmp_path / "b.txt"]
    assert (tmp_path / "b.txt").read_bytes() == b"new b"


def test_read_checkpoint_config_may_fall_back_to_the_copy_in_the_weights_file(tmp_path):
    save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, {"step": 3})
    recorded = read_checkpoint_config(tmp_path / "ckpt")
    assert recorded[checkpoint.HASH_KEY] == file_sha256(tmp_path / "ckpt.safetensors")
    (tmp_path / "ckpt.json").unlink()
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint_config(tmp_path / "ckpt")
    with pytest.warns(UserWarning, match="using the copy of the config stored in"):
        embedded = read_checkpoint_config(tmp_path / "ckpt", use_embedded_copy=True)
    assert embedded["step"] == 3 and embedded["save_id"] == recorded["save_id"]


@pytest.mark.parametrize(
    "config_cls, kwargs, words",
    [(VAEConfig, {"base_channels": 65536}, r"VAEConfig\.base_channels must be at most 16384"),
     (VAEConfig, {"channel_multipliers": (1, 2, 4096)}, r"base_channels × channel_multipliers must be at most"),
     (VAEConfig, {"num_res_blocks": 5000}, r"num_res_blocks must be at most 1024"),
     (DenoiserConfig, {"width": 65536, "heads": 4}, r"DenoiserConfig\.width must be at most 16384, got 65536"),
     (DenoiserConfig, {"depth": 10**6}, r"DenoiserConfig\.depth must be at most 1024"),
     (DenoiserConfig, {"mlp_ratio": float("nan")}, r"DenoiserConfig\.mlp_ratio must be a finite number at most 64"),
     (TextEncoderConfig, {"vocab_size": 10**7}, r"TextEncoderConfig\.vocab_size must be at most 262144"),
     (TinyCLIPConfig, {"image_channels": (16, 10**6)}, r"TinyCLIPConfig\.image_channels must be at most 16384 each"),
     (TinyCLIPConfig, {"image_size": 0}, r"TinyCLIPConfig\.image_size must be a positive integer"),
     (ClassifierConfig, {"widths": (16, 10**6)}, r"ClassifierConfig\.widths must be at most 16384 each")],
)
def test_absurd_sizes_are_refused_by_every_config(config_cls, kwargs, words):
    with pytest.raises(ValueError, match=words):
        config_cls(**kwargs)
