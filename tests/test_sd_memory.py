"""sdlearn.stable_diffusion in low memory: one network at a time, the same images, and the U-Net's weights held once.

Run on the tiny random Stable Diffusion folder of :func:`sdlearn.stable_diffusion.write_tiny_sd_folder` (no network).
What the low-memory mode saves on the real SD v1.5 is measured by benchmarks/sd_memory.py on a full-size folder.
"""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # a guard: nothing here may download
os.environ["TRANSFORMERS_OFFLINE"] = "1"

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from sdlearn import stable_diffusion as sd  # noqa: E402
from sdlearn.unet import UNet, sdlearn_name  # noqa: E402

SIZE = sd.TINY_SD_SIZE
PROMPTS = ["a red circle", "the blue square"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sd.write_tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd_memory") / "sd", seed=1)


@pytest.fixture(scope="module")
def pipe(folder):
    return sd.load_diffusers_pipeline(folder)


@pytest.fixture(scope="module")
def lean(folder):
    return sd.load_diffusers_pipeline(folder, low_memory=True)


def test_a_low_memory_pipeline_holds_configurations_only(pipe, lean):
    assert lean.low_memory and not pipe.low_memory
    assert set(lean.loaders) == set(sd.NETWORKS)
    for name in sd.NETWORKS:  # shapes on the meta device, the same as the loaded networks'
        module = getattr(lean, name)
        assert all(p.is_meta for p in module.parameters()), name
        assert {n: p.shape for n, p in module.named_parameters()} == \
            {n: p.shape for n, p in getattr(pipe, name).named_parameters()}, name
    assert isinstance(lean.unet, UNet) and lean.device == torch.device("cpu")
    assert lean.image_size(None, None) == pipe.image_size(None, None) == (SIZE, SIZE)
    assert "low memory" in repr(lean) and "low memory" not in repr(pipe)


@pytest.mark.parametrize("options", [
    {"seed": 0},
    {"seed": 3, "negative_prompt": "blue", "sampler": "euler", "num_images_per_prompt": 2},
    {"seed": 5, "guidance_scale": 1.0},  # no guidance: one pass of the U-Net per step
    {"seed": 7, "guidance_interval": (0.0, 500.0), "sampler": "ddpm"},
])
def test_low_memory_images_equal_the_held_networks_images(pipe, lean, options):
    kwargs = {"num_inference_steps": 3, "height": SIZE, "width": SIZE, "progress": False, **options}
    assert torch.equal(lean(PROMPTS, **kwargs), pipe(PROMPTS, **kwargs))


def test_low_memory_encode_and_decode_equal(pipe, lean):
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = pipe.encode_image(images)
    assert torch.equal(lean.encode_image(images), latents)
    assert torch.equal(lean.decode_latents(latents), pipe.decode_latents(latents))
    assert torch.equal(lean.encode_prompt(PROMPTS), pipe.encode_prompt(PROMPTS))


def test_each_network_is_freed_before_the_next_is_loaded(folder):
    lean = sd.load_diffusers_pipeline(folder, low_memory=True)
    loaded: list[tuple[str, weakref.ref]] = []

    def watched(name, load):
        def load_and_watch():
            alive = [earlier for earlier, ref in loaded if ref() is not None]
            assert not alive, f"{alive} still in memory when {name} is loaded"
            module = load()
            loaded.append((name, weakref.ref(module)))
            return module
        return load_and_watch

    lean.loaders = {name: watched(name, load) for name, load in lean.loaders.items()}
    seen = []
    images = lean(PROMPTS, num_inference_steps=2, seed=0, height=SIZE, width=SIZE, progress=False,
                  callback=lambda i, t, latents, x0: seen.append([n for n, ref in loaded if ref() is not None]))
    assert [name for name, _ in loaded] == ["text_encoder", "unet", "vae"]  # one call: each network once, in order
    assert seen == [["unet"], ["unet"]]  # while denoising, the U-Net alone is in memory
    gc.collect()
    assert all(ref() is None for _, ref in loaded)  # and nothing is kept after the call
    assert images.shape == (2, 3, SIZE, SIZE)


def test_a_failed_call_keeps_no_network_and_the_next_call_works(folder, pipe):
    lean = sd.load_diffusers_pipeline(folder, low_memory=True)
    refs = []

    def load_unet(load=lean.loaders["unet"]):
        module = load()
        refs.append(weakref.ref(module))
        return module

    lean.loaders["unet"] = load_unet

    def stop(i, t, latents, x0):
        raise ValueError("stopped by the callback")

    kwargs = {"num_inference_steps": 2, "seed": 0, "height": SIZE, "width": SIZE, "progress": False}
    with pytest.raises(ValueError, match="stopped by the callback"):
        lean("a red circle", callback=stop, **kwargs)
    gc.collect()
    assert len(refs) == 1 and refs[0]() is None  # once the error is handled, the pipeline holds no U-Net
    assert torch.equal(lean("a red circle", **kwargs), pipe("a red circle", **kwargs))
    assert len(refs) == 2  # loaded afresh


def test_the_command_line_runs_a_folder_in_low_memory(folder, tmp_path, monkeypatch):
    import sdlearn.__main__ as cli

    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return sd.load_diffusers_pipeline(*args, **kwargs)

    monkeypatch.setattr(cli, "load_diffusers_pipeline", recording)
    assert cli.main(["generate", "a red circle", "--diffusers", str(folder), "--height", "32", "--width", "32",
                     "--steps", "2", "--out", str(tmp_path / "grid.png")]) == 0
    assert [call.get("low_memory") for call in calls] == [True]
    assert (tmp_path / "grid.png").is_file()


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_low_memory_must_be_a_bool(folder, bad):
    with pytest.raises(ValueError, match="low_memory must be True or False"):
        sd.load_diffusers_pipeline(folder, low_memory=bad)


@pytest.mark.parametrize("loaders", [
    {"unet": lambda: None, "vae": lambda: None},  # one missing
    {"unet": lambda: None, "vae": lambda: None, "text_encoder": "not a function"},
    ["unet", "vae", "text_encoder"],
])
def test_bad_loaders_are_refused_in_one_line(pipe, loaders):
    with pytest.raises(ValueError, match="loaders must map 'text_encoder', 'unet', 'vae'"):
        sd.SDPipeline(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.schedule, loaders=loaders)


def test_network_names_are_checked(lean):
    with pytest.raises(ValueError, match="name must be one of text_encoder, unet, vae"):
        lean.network("tokenizer")


def test_to_moves_where_a_low_memory_pipeline_loads(folder):
    lean = sd.load_diffusers_pipeline(folder, low_memory=True, device="cpu")
    assert lean.to("meta").device == torch.device("meta")
    assert lean.network("vae").decoder.conv_in.weight.is_meta  # loaded, then put where the pipeline is
    assert lean.to("cpu").device == torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------
# unet_from_pretrained: the weights in memory once


class RecordingOpen:
    """safetensors' safe_open, recording where each tensor it hands out lies: ``(name, data_ptr)``."""

    served: list = []
    real = None

    def __init__(self, *args, **kwargs):
        self.handle = RecordingOpen.real(*args, **kwargs)

    def __enter__(self):
        self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def keys(self):
        return self.handle.keys()

    def offset_keys(self):
        return self.handle.offset_keys()

    def metadata(self):
        return self.handle.metadata()

    def get_tensor(self, name):
        tensor = self.handle.get_tensor(name)
        RecordingOpen.served.append((name, tensor.data_ptr()))
        return tensor

    def get_tensors(self):
        return {name: self.get_tensor(name) for name in self.handle.keys()}


def mapped_ranges(path) -> list[tuple[int, int]]:
    """The address ranges where this process maps the file ``path`` now (Linux's /proc/self/maps)."""
    ranges = []
    for line in open("/proc/self/maps"):
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].strip() == str(path):
            low, high = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((low, high))
    return ranges


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_unet_weights_are_the_files_own_and_fused_parts_are_released(folder, monkeypatch):
    import safetensors
    import safetensors.torch

    RecordingOpen.real, RecordingOpen.served = safetensors.safe_open, []
    monkeypatch.setattr(safetensors, "safe_open", RecordingOpen)
    monkeypatch.setattr(safetensors.torch, "safe_open", RecordingOpen)
    unet = sd.unet_from_pretrained(folder)
    gc.collect()
    file = (folder / "unet" / "diffusion_pytorch_model.safetensors").resolve()
    ranges = mapped_ranges(file)
    assert ranges, "the U-Net's weights are not mapped from the file"

    def in_map(pointer):
        return any(low <= pointer < high for low, high in ranges)

    parameters = dict(unet.named_parameters())
    fused = 0
    for name, pointer in RecordingOpen.served:
        target, _, parts = sdlearn_name(name)
        if parts > 1:  # concatenated into a copy: the pages it was read from must not stay mapped beside it
            fused += 1
            assert not in_map(pointer), f"{name} was concatenated, but its pages in the file stay mapped"
        else:  # taken over, not copied (.float() of a float32 tensor is the tensor itself)
            assert parameters[target].data_ptr() == pointer and in_map(pointer), f"{target} is a copy of {name}"
    blocks = sum(type(m).__name__ == "TransformerBlock" for m in unet.modules())
    assert blocks and fused == 5 * blocks  # each transformer block fuses Q, K, V and K, V
    from diffusers import UNet2DConditionModel

    reference = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 32)
    with torch.no_grad():  # and it is the folder's U-Net
        torch.testing.assert_close(unet(x, 500, text), reference(x, 500, text).sample, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# storage_dtype: the U-Net's weights in half precision, computed in float32


def stored_dtypes(unet) -> dict[str, torch.dtype]:
    """What each Linear/conv parameter is stored as (its parametrization's original), by layer."""
    from torch.nn.utils import parametrize

    return {f"{name}.{p}": layer.parametrizations[p].original.dtype
            for name, layer in unet.named_modules() if parametrize.is_parametrized(layer)
            for p in layer.parametrizations}


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
@pytest.mark.parametrize("dtype", [torch.float16, "bfloat16"])
def test_a_half_stored_unet_releases_the_file_and_computes_what_diffusers_layerwise_casting_does(folder, dtype,
                                                                                                 tmp_path):
    import shutil

    from diffusers import UNet2DConditionModel

    from sdlearn.unet import STORAGE_DTYPES

    half = STORAGE_DTYPES.get(dtype, dtype)
    folder = shutil.copytree(folder, tmp_path / "sd")  # a file no other test's pipeline holds mapped
    unet = sd.unet_from_pretrained(folder, storage_dtype=dtype)
    gc.collect()
    file = (folder / "unet" / "diffusion_pytorch_model.safetensors").resolve()
    assert mapped_ranges(file) == []  # converted as read: no page of the float32 file stays mapped
    stored = stored_dtypes(unet)
    layers = [m for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    expected = sum(1 + (m.bias is not None) for m in layers)
    assert len(stored) == expected and set(stored.values()) == {half}  # every Linear/conv weight and bias
    norms = [m for m in unet.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)  # normalisation stays float32
    assert all(not p.requires_grad for p in unet.parameters())

    full = sd.unet_from_pretrained(folder)
    reference = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    reference.enable_layerwise_casting(storage_dtype=half, compute_dtype=torch.float32)
    x, text = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(2, 16, 32)
    with torch.no_grad():
        ours, theirs, exact = unet(x, 500, text), reference(x, 500, text).sample, full(x, 500, text)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)  # the same stored numbers, the same function
    error = ((ours - exact).norm() / exact.norm()).item()  # only the weights' rounding apart from float32
    assert 0 < error < (2e-2 if half == torch.bfloat16 else 3e-3)


def test_store_weights_is_a_no_op_in_float32_and_refuses_other_dtypes():
    from sdlearn.unet import store_weights

    layer = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GroupNorm(2, 4))
    before = layer[0].weight
    assert store_weights(layer, "float32") is layer and layer[0].weight is before
    for bad in ("half", torch.int8, 16, None):
        with pytest.raises(ValueError, match="storage dtype must be one of float32, float16, bfloat16"):
            store_weights(layer, bad)
    store_weights(layer, torch.float16)
    x = torch.randn(5, 3)
    rounded = torch.nn.functional.linear(x, before.detach().half().float(), layer[0].bias)
    torch.testing.assert_close(layer[0](x), rounded)
    store_weights(layer, torch.float16)  # twice: already stored, left alone
    assert layer[0].parametrizations.weight.original.dtype == torch.float16


def test_a_half_stored_low_memory_pipeline_draws_nearly_the_float32_images(pipe, folder):
    kwargs = dict(num_inference_steps=3, seed=0, height=SIZE, width=SIZE, progress=False)
    half = sd.load_diffusers_pipeline(folder, low_memory=True, storage_dtype="float16")
    ours, exact = half(PROMPTS, **kwargs), pipe(PROMPTS, **kwargs)
    assert not torch.equal(ours, exact) and (ours - exact).abs().max() < 2e-2
    with pytest.raises(ValueError, match="storage dtype must be one of"):
        sd.load_diffusers_pipeline(folder, storage_dtype="float64")


@pytest.mark.parametrize("option, expected", [([], "float16"), (["--storage-dtype", "float32"], "float32")])
def test_the_command_line_stores_the_unet_in_float16_by_default(folder, tmp_path, monkeypatch, option, expected):
    import sdlearn.__main__ as cli

    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return sd.load_diffusers_pipeline(*args, **kwargs)

    monkeypatch.setattr(cli, "load_diffusers_pipeline", recording)
    assert cli.main(["generate", "a red circle", "--diffusers", str(folder), "--height", "32", "--width", "32",
                     "--steps", "2", "--out", str(tmp_path / "grid.png"), *option]) == 0
    assert [(call.get("low_memory"), call.get("storage_dtype")) for call in calls] == [(True, expected)]
