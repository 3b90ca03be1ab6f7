"""Issue 14's memory target: Stable Diffusion v1.5 run by sdlearn in under 4 GB, measured on full-size weights.

    python benchmarks/sd_memory.py [--folder DIR] [--keep] [--steps 2] [--size 256] [--repeats 1] [--kernel]
                                   [--diffusers-pipeline] [--out [NAME]]

No real Stable Diffusion weights are needed (and nothing is downloaded). The script first writes a **randomly
initialised SD v1.5 folder at full size** in diffusers' format: ``unet/``, ``vae/`` and ``text_encoder/`` built from
the published configurations in :mod:`sdlearn.stable_diffusion` (``SD_V1_5_UNET_CONFIG`` …) and saved as float32
safetensors, like SD v1.5's main files (4.26 GB); the published PNDM ``scheduler/``; and the letters tokenizer of
:func:`~sdlearn.stable_diffusion.write_tiny_sd_folder` with CLIP's 77 tokens (its ids lie inside CLIP's vocabulary).
Memory depends on the shapes, not on the values, so the peaks are those of the real SD v1.5; the images are noise.
The folder goes to ``--folder`` (default: a new temporary folder, deleted at the end unless ``--keep``); a folder
this script wrote before is reused as it is, and left in place.

Then each run below happens in a **fresh process**, as a learner who restarts the kernel gets, and its peak resident
memory is read: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` and, on Linux, ``VmHWM`` of ``/proc/self/status``.

(c) **baseline**: the imports of notebook 10's first cell and section 6 (and the first cell's two course
    pipelines), nothing of SD loaded; and the CLI's imports alone;
(a) **notebook 10's section 6**: after the same imports, the staged loop the notebook writes out, one network in
    memory at a time: CLIP's text tower (loaded, used, freed), sdlearn's U-Net through ``unet_from_pretrained``
    with its Linear and conv weights stored in float16 and computed in float32 (``storage_dtype="float16"``,
    the notebook's default; loaded, ``--steps`` DDIM steps under guidance 7.5, freed), diffusers'
    ``UNet2DConditionModel`` (built on the meta device, given the same float16 tensors, with diffusers' own
    ``enable_layerwise_casting``; the same steps; freed), the VAE decoding both sets of latents; two prompts at
    ``--size`` × ``--size``. Each stage's own peak is reported: Linux lets a process reset its peak
    (writing 5 to ``/proc/self/clear_refs`` resets ``VmHWM`` and ``ru_maxrss`` alike), so after each stage the peak
    is read and reset, and the process's peak is the largest stage's;
(b) **the command line**: ``python -m sdlearn generate PROMPT --diffusers FOLDER --height 256 --width 256 --steps 2
    --n 2`` (its peak from ``os.wait4``, and ``VmHWM`` polled while it runs);
(b') what the command line runs, ``load_diffusers_pipeline(FOLDER, low_memory=True, storage_dtype="float16")``,
    stage by stage: its loaders and its step callback wrapped to close a stage where a network is loaded and after
    each step;
(e) (b') with the U-Net in float32 (``storage_dtype="float32"``), for comparison: what float16 storage saves;
(a') with ``--kernel``: (a) again inside a fresh Jupyter kernel (``jupyter_client``), what the notebook runs in;
(d) with ``--diffusers-pipeline``: diffusers' own ``StableDiffusionPipeline.from_pretrained`` on the folder, the
    same two images (for comparison; no target).

Besides each peak, what is resident at the end of each stage is split into anonymous memory (the process's own) and
file-backed pages (the weights files are memory-mapped, not copied: their pages count as resident once read).

The peaks vary a little from run to run (how the allocator reuses freed memory differs), so ``--repeats N`` runs
each measurement N times, each in a fresh process, and the summary gives the largest with every run's beside it.

The number of DDIM steps changes the peak only a little: every step runs the same U-Net on the same shapes, but the
allocator keeps some of each step's freed memory, so the peak creeps up over the first steps by a few hundredths of
a GB. ``--steps`` sets them: the default, 2, is quick; ``--steps 10`` measures what notebook 10 runs.

GB here is 10⁹ bytes; the target is 4.0 × 10⁹ bytes (issue 14: every notebook and command peaks under 4 GB).
Threads: the children inherit ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET_BYTES = 4.0e9  # issue 14's target, GB = 10⁹ bytes
GB = 1e9
MARKER = "sd_memory.json"  # written last into a finished random folder: what the script reuses
PROMPTS = ["a photograph of an astronaut riding a horse", "a red circle on a black background"]  # notebook 10's
GUIDANCE, SEED = 7.5, 0
STORAGE = "float16"  # the U-Net's Linear/conv weights, computed in float32: notebook 10's and the CLI's default
RESULT_TAG = "SD_MEMORY_RESULT "  # a child's last line: this tag and its JSON


# -- peaks -----------------------------------------------------------------------------------------------------
def status_bytes(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of ``/proc/PID/status`` in bytes ({} where there is no /proc)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile") and value.strip().endswith("kB"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def maxrss_bytes(usage=None) -> int:
    peak = (usage or resource.getrusage(resource.RUSAGE_SELF)).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def reset_peak() -> bool:
    """Reset this process's peak resident memory to what it holds now (Linux ≥ 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Stages:
    """Each stage's own peak (ru_maxrss and VmHWM, reset after reading), what is resident after it (all of it, and
    the anonymous and file-backed parts: a memory-mapped weights file's pages are file-backed), its seconds."""

    def __init__(self):
        self.rows: list[dict] = []
        self.resets = reset_peak()
        self.clock = time.perf_counter()

    def end(self, name: str, collect: bool = True) -> None:
        if collect:
            import gc

            gc.collect()
        status = status_bytes()
        self.rows.append({"stage": name, "ru_maxrss": maxrss_bytes(), "VmHWM": status.get("VmHWM"),
                          "rss_after": status.get("VmRSS"), "anon_after": status.get("RssAnon"),
                          "file_after": status.get("RssFile"), "seconds": time.perf_counter() - self.clock})
        self.resets = reset_peak() and self.resets
        self.clock = time.perf_counter()

    def result(self) -> dict:
        return {"stages": self.rows, "resets": self.resets}


# -- the random full-size folder -----------------------------------------------------------------------------
def fill_randomly(module, generator, scale: float = 0.02):
    """A module built on the meta device → real CPU tensors of small random numbers (no slow default init)."""
    import torch

    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.uniform_(-scale, scale, generator=generator)
        for name, buffer in module.named_buffers():
            if name.endswith("position_ids"):  # CLIP's (not saved: rebuilt on loading)
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
            else:
                raise ValueError(f"unexpected buffer {name}: fill it before saving")
    return module.eval()


def is_random_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a finished folder of this script (its marker, written last, and the weights)."""
    weights = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
               "text_encoder/model.safetensors", "model_index.json")
    return (folder / MARKER).is_file() and all((folder / name).is_file() for name in weights)


def write_random_sd_folder(folder: Path, seed: int = 0) -> dict[str, int]:
    """SD v1.5 at full size, random, in diffusers' format, at ``folder`` (new or empty); returns bytes per part.
    One network in memory at a time (the U-Net's save holds it about twice: 7 GB for a minute)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdlearn.checkpoint import atomic_write_bytes
    from sdlearn.stable_diffusion import (
        SD_V1_5_SCHEDULER_CONFIG,
        SD_V1_5_TEXT_ENCODER_CONFIG,
        SD_V1_5_UNET_CONFIG,
        SD_V1_5_VAE_CONFIG,
        SD_V1_TOKENS,
        write_tiny_sd_folder,
    )

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:  # the tiny folder lends its tokenizer and index
        tiny = write_tiny_sd_folder(Path(scratch) / "tiny", seed=seed)
        tokenizer = CLIPTokenizer.from_pretrained(tiny / "tokenizer", local_files_only=True,
                                                  model_max_length=SD_V1_TOKENS)
        tokenizer.save_pretrained(folder / "tokenizer")
        index = json.loads((tiny / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]  # SD v1.5 ships PNDM; sdlearn and the notebook use DDIM
    PNDMScheduler.from_config(SD_V1_5_SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")

    def save(name, build):
        print(f"  writing {name}/ ...", flush=True)
        with torch.device("meta"):
            module = build()
        fill_randomly(module, generator).save_pretrained(folder / name, safe_serialization=True)

    save("unet", lambda: UNet2DConditionModel.from_config(SD_V1_5_UNET_CONFIG))
    save("vae", lambda: AutoencoderKL.from_config(SD_V1_5_VAE_CONFIG))
    text_config = {k: v for k, v in SD_V1_5_TEXT_ENCODER_CONFIG.items()
                   if k not in ("architectures", "model_type", "torch_dtype")}
    save("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**text_config)))
    atomic_write_bytes(folder / "model_index.json", json.dumps(index, indent=2).encode())
    sizes = {name: sum(f.stat().st_size for f in (folder / name).glob("*.safetensors"))
             for name in ("unet", "vae", "text_encoder")}
    atomic_write_bytes(folder / MARKER, json.dumps({"seed": seed, "bytes": sizes}, indent=2).encode())
    return sizes


# -- what each child runs ------------------------------------------------------------------------------------
def notebook_imports():
    """What a fresh kernel holds after notebook 10's first cell and section 6's imports (its own SD aside)."""
    import matplotlib

    if "ipykernel" not in sys.modules:
        matplotlib.use("Agg")
    import diffusers  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import torch
    import torch.nn.functional  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from torch.utils.flop_counter import FlopCounterMode  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    import sdlearn.exercises  # noqa: F401
    import sdlearn.metrics  # noqa: F401
    import sdlearn.recipes  # noqa: F401
    import sdlearn.stable_diffusion  # noqa: F401
    from sdlearn.pretrained import load_pipeline

    torch.manual_seed(0)
    torch.set_num_threads(1)  # as the notebook's first cell
    return load_pipeline(), load_pipeline(denoiser="unet")  # the first cell's course pipelines (a few MB)


def run_write(folder: Path, steps: int, size: int) -> dict:
    started = time.perf_counter()
    sizes = write_random_sd_folder(folder)
    return {"bytes": sizes, "seconds": time.perf_counter() - started}


def run_baseline(folder: Path, steps: int, size: int) -> dict:
    stages = Stages()
    course = notebook_imports()
    stages.end("imports of notebook 10's first cell and section 6")
    del course
    return stages.result()


def run_cli_imports(folder: Path, steps: int, size: int) -> dict:
    stages = Stages()
    import diffusers  # noqa: F401  (what --diffusers imports when it reads the folder)
    import transformers  # noqa: F401

    import sdlearn.__main__  # noqa: F401

    stages.end("imports of python -m sdlearn and diffusers, transformers")
    return stages.result()


def run_staged(folder: Path, steps: int, size: int) -> dict:
    """Notebook 10's section 6 with ``SD_PATH = folder``: the same stages, written as the notebook writes them."""
    import gc

    stages = Stages()
    course = notebook_imports()
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdlearn.samplers import classifier_free_guidance, get_sampler, sample
    from sdlearn.stable_diffusion import (
        read_safetensors,
        schedule_from_scheduler_config,
        unet_from_pretrained,
    )

    stages.end("imports (notebook 10's first cell and section 6)")
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    noise = torch.randn((len(PROMPTS), vae_config["latent_channels"], size // factor, size // factor),
                        generator=torch.Generator().manual_seed(SEED))

    def encode_text(prompts):
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True, use_safetensors=True)
        ids = tokenizer([""] * len(prompts) + prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return encoder.eval()(ids)[0]

    def denoise_with_sdlearn(tokens):
        schedule, options = schedule_from_scheduler_config(
            json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
        unet = unet_from_pretrained(folder, STORAGE, num_train_timesteps=schedule.num_train_timesteps,
                                    prediction_type=options["prediction_type"])
        sampler = get_sampler("ddim", schedule, prediction_type=options["prediction_type"],
                              set_alpha_to_one=options["set_alpha_to_one"], clip_sample=options["clip_sample"])

        def model_fn(x, t):
            eps_uncond, eps_cond = unet(torch.cat([x, x]), t, tokens).chunk(2)
            return classifier_free_guidance(eps_uncond, eps_cond, GUIDANCE)

        with torch.no_grad():
            return sample(model_fn, sampler, noise.shape, steps, noise=noise, spacing=options["spacing"],
                          steps_offset=options["steps_offset"], progress=False)

    def denoise_with_diffusers(tokens):
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        weights = sorted((folder / "unet").glob("diffusion_pytorch_model*.safetensors"))
        unet.load_state_dict(read_safetensors(weights, STORAGE), assign=True)
        if STORAGE != "float32":
            unet.enable_layerwise_casting(storage_dtype=getattr(torch, STORAGE), compute_dtype=torch.float32)
        scheduler_config = DDIMScheduler.load_config(folder / "scheduler")
        scheduler = DDIMScheduler.from_config(scheduler_config, clip_sample=scheduler_config.get("clip_sample", False))
        scheduler.set_timesteps(steps)
        x = noise * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:
                eps_uncond, eps_cond = unet.eval()(torch.cat([x, x]), t, encoder_hidden_states=tokens).sample.chunk(2)
                x = scheduler.step(eps_uncond + GUIDANCE * (eps_cond - eps_uncond), t, x, eta=0.0).prev_sample
        return x

    def decode(*latents):
        vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True, use_safetensors=True).eval()
        with torch.no_grad():
            return [vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1) for z in latents]

    tokens = encode_text(PROMPTS)
    gc.collect()
    stages.end("1 text encoder: load, encode, free")
    latents_sdlearn = denoise_with_sdlearn(tokens)
    gc.collect()
    stages.end(f"2 sdlearn's U-Net (unet_from_pretrained): load, {steps} steps, free")
    latents_diffusers = denoise_with_diffusers(tokens)
    gc.collect()
    stages.end(f"3 diffusers' U-Net (meta + assign): load, {steps} steps, free")
    images = decode(latents_sdlearn, latents_diffusers)
    stages.end("4 VAE: load, decode both, free")
    result = stages.result()
    result["difference"] = (images[0] - images[1]).abs().max().item()
    result["finite"] = all(bool(torch.isfinite(i).all()) for i in images)
    del course
    return result


def run_low_memory_pipeline(folder: Path, steps: int, size: int, storage: str = STORAGE) -> dict:
    """What the CLI runs (sdlearn's SDPipeline, ``low_memory=True``, the U-Net stored in ``storage``), stage by
    stage: its loaders and its step callback are wrapped to close a stage where each network is loaded and after
    each step."""
    stages = Stages()
    import sdlearn.__main__  # noqa: F401  (the CLI's imports)
    from sdlearn.stable_diffusion import load_diffusers_pipeline

    pipe = load_diffusers_pipeline(folder, low_memory=True, storage_dtype=storage)
    stages.end(f"imports, load_diffusers_pipeline(low_memory=True, storage_dtype={storage!r})")
    closing = {"unet": "text encoder: encode, free", "vae": f"U-Net: step {steps}, free"}
    labels = {"text_encoder": "text encoder", "unet": "U-Net", "vae": "VAE"}

    def watched(name, load):
        def load_and_close():
            if name in closing:
                stages.end(closing[name])
            module = load()
            stages.end(f"{labels[name]}: load")
            return module
        return load_and_close

    pipe.loaders = {name: watched(name, load) for name, load in pipe.loaders.items()}
    images = pipe(PROMPTS[0], num_images_per_prompt=2, num_inference_steps=steps, guidance_scale=GUIDANCE,
                  seed=SEED, height=size, width=size, progress=False,
                  callback=lambda i, t, x, x0: stages.end(f"U-Net: step {i + 1}", collect=False) if i + 1 < steps
                  else None)
    stages.end("VAE: decode, free")
    result = stages.result()
    result["images"] = list(images.shape)
    return result


def run_diffusers_pipeline(folder: Path, steps: int, size: int) -> dict:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    stages = Stages()
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    stages.end("from_pretrained (all three networks)")
    pipe(PROMPTS, num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size,
         generator=torch.Generator().manual_seed(SEED), output_type="pt")
    stages.end(f"{steps} steps and the decode")
    return stages.result()


def run_low_memory_float32(folder: Path, steps: int, size: int) -> dict:
    return run_low_memory_pipeline(folder, steps, size, storage="float32")


CHILDREN = {"write": run_write, "baseline": run_baseline, "cli-imports": run_cli_imports, "staged": run_staged,
            "low-memory-pipeline": run_low_memory_pipeline, "low-memory-float32": run_low_memory_float32,
            "diffusers-pipeline": run_diffusers_pipeline}


def child_main(kind: str, folder: Path, steps: int, size: int) -> None:
    result = CHILDREN[kind](folder, steps, size)
    print(RESULT_TAG + json.dumps(result), flush=True)


# -- the parent: fresh processes and what they report -------------------------------------------------------
def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               DIFFUSERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPOSITORY), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_process(argv: list[str]) -> dict:
    """Run ``argv`` to its end in a fresh process: its exit code, output, seconds, peak (``os.wait4``'s ru_maxrss,
    and the last ``VmHWM`` polled from /proc while it ran) and the JSON of its result line, if any."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(argv, stdout=out, stderr=err, env=child_env(), cwd=REPOSITORY)
        hwm = None
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            hwm = status_bytes(process.pid).get("VmHWM", hwm)
            time.sleep(0.1)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    result = {"code": process.returncode, "seconds": time.perf_counter() - started, "ru_maxrss": maxrss_bytes(usage),
              "VmHWM": hwm, "stderr": stderr}
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result["report"] = json.loads(line[len(RESULT_TAG):])
    return result


def run_in_kernel(folder: Path, steps: int, size: int) -> dict:
    """(a) inside a fresh Jupyter kernel: this file is loaded there as a module and :func:`run_staged` called."""
    from jupyter_client.manager import start_new_kernel

    started = time.perf_counter()
    manager, client = start_new_kernel(env=child_env(), cwd=str(REPOSITORY), stderr=subprocess.DEVNULL)
    lines = []

    def keep(message):
        if message["msg_type"] == "stream":
            lines.append(message["content"]["text"])
        elif message["msg_type"] == "error":
            lines.append("\n".join(message["content"]["traceback"]))

    code = (f"%matplotlib inline\nimport importlib.util, json\n"
            f"spec = importlib.util.spec_from_file_location('sd_memory', {str(Path(__file__).resolve())!r})\n"
            f"sd_memory = importlib.util.module_from_spec(spec); spec.loader.exec_module(sd_memory)\n"
            f"from pathlib import Path\n"
            f"sd_memory.child_main('staged', Path({str(folder)!r}), {steps}, {size})\n")
    try:
        client.execute_interactive(code, timeout=3600, output_hook=keep)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    result = {"code": 1, "seconds": time.perf_counter() - started, "stderr": "".join(lines)}
    for line in "".join(lines).splitlines():
        if line.startswith(RESULT_TAG):
            result.update(code=0, report=json.loads(line[len(RESULT_TAG):]))
    return result



def _load_report_tools():
    """benchmarks/report.py, loaded from its file (sys.path untouched: the scripts here are named like sdlearn's
    modules)."""
    spec = importlib.util.spec_from_file_location("sdlearn_benchmark_report", Path(__file__).resolve().parent / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report_tools = _load_report_tools()
Report = report_tools.Report


def gb(value: int | None) -> str:
    return "  n/a" if value is None else f"{value / GB:5.2f}"


def verdict(peak: int) -> str:
    return f"{'UNDER' if peak < TARGET_BYTES else 'OVER'} 4 GB by {abs(TARGET_BYTES - peak) / GB:.2f} GB"


def say_child(report: Report, label: str, run: dict) -> int | None:
    """Print one child's figures; returns its peak in bytes (None if it failed)."""
    inner = run.get("report")
    if run["code"] != 0 or inner is None:
        report.say(f"  {label}: FAILED (exit {run['code']}): {run['stderr'].strip().splitlines()[-3:]}")
        return None
    stages = inner["stages"]
    if not inner["resets"]:
        report.say("    (this system cannot reset a process's peak: each stage shows the peak so far)")
    for row in stages:
        report.say(f"    {row['stage']:62} peak {gb(row['ru_maxrss'])} GB (VmHWM {gb(row['VmHWM'])}); after: "
                   f"{gb(row['rss_after'])} GB = anonymous {gb(row['anon_after'])} + file {gb(row['file_after'])}  "
                   f"[{row['seconds']:.0f} s]")
    peak = max(max(row["ru_maxrss"], row["VmHWM"] or 0) for row in stages)
    report.say(f"  {label}: peak {peak / GB:.2f} GB ({peak:,} bytes) → {verdict(peak)}  [{run['seconds']:.0f} s]")
    return peak


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=None, help="where the random SD v1.5 folder is written (or reused); "
                                                       "default: a new temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the folder this run wrote (4.3 GB) for a next run")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps (default 2, quick; the peak creeps up a "
                                                             "little with more; notebook 10 runs 10)")
    parser.add_argument("--size", type=int, default=256, help="image height and width (default 256, notebook 10's)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each measurement, each in a fresh process "
                                                                 "(default 1): the peaks vary a little from run to run")
    parser.add_argument("--kernel", action="store_true", help="also run notebook 10's staged loop in a fresh "
                                                              "Jupyter kernel (needs jupyter_client)")
    parser.add_argument("--diffusers-pipeline", action="store_true",
                        help="also measure diffusers' StableDiffusionPipeline (no target; needs about 8 GB)")
    parser.add_argument("--out", nargs="?", const="", default=None, metavar="NAME",
                        help="also write the report to benchmarks/results/NAME (default sd_memory-DATE.txt)")
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be ≥ 1, got {args.repeats}")
    if args.steps < 1:
        parser.error(f"--steps must be ≥ 1, got {args.steps}")
    if args.size < 64 or args.size % 64:
        parser.error(f"--size must be a multiple of 64 (SD's VAE factor 8 × its U-Net's 8), got {args.size}")
    if args.child and not args.folder:
        parser.error("--child needs --folder")
    return parser, args


def main(argv: Sequence[str] | None = None, results_dir: Path = RESULTS_DIR) -> Path | None:
    parser, args = parse_args(argv)
    if args.child:
        child_main(args.child, Path(args.folder), args.steps, args.size)
        return None
    started, clock = datetime.now(), time.perf_counter()
    folder = Path(args.folder or tempfile.gettempdir()).expanduser().resolve()
    if folder == REPOSITORY or REPOSITORY in folder.parents:
        parser.error(f"{'--folder' if args.folder else 'the temporary folder'} {folder} is inside the repository: "
                     f"give a --folder outside it (the folder is 4.3 GB)")
    if not args.folder:
        folder = Path(tempfile.mkdtemp(prefix="sd-memory-"))
    reused = is_random_folder(folder)
    if not reused and folder.exists() and any(folder.iterdir()):
        parser.error(f"--folder {folder} holds files but not a folder this script wrote: give a new or empty one")
    report = Report()
    me = [sys.executable, str(Path(__file__).resolve()), "--folder", str(folder), "--steps", str(args.steps),
          "--size", str(args.size), "--child"]
    try:
        # This process imports no torch and writes nothing big itself: a child's ru_maxrss starts from its parent's
        # peak (Linux carries it across exec), so the parent must stay smaller than any figure it reads.
        if reused:
            print(f"reusing the random SD v1.5 folder at {folder}")
        else:
            print(f"writing a random SD v1.5 folder at {folder} (4.3 GB) ...", flush=True)
            run = run_process([*me, "write"])
            if run["code"] != 0 or "report" not in run:
                raise SystemExit(f"error: writing the folder failed: {run['stderr'].strip()}")
            print(f"  written in {run['report']['seconds']:.0f} s", flush=True)
        sizes = json.loads((folder / MARKER).read_text())["bytes"]
        version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], text=True,
                                 capture_output=True, env=child_env()).stdout.strip() or "?"
        threads = os.environ.get("OMP_NUM_THREADS", "unset")
        report.say(f"Stable Diffusion v1.5's memory through sdlearn (issue 14): a full-size random "
                   f"SD v1.5 folder, {args.size} × {args.size}, {len(PROMPTS)} prompts, {args.steps} DDIM steps, "
                   f"guidance {GUIDANCE}; torch {version}, OMP_NUM_THREADS={threads}, {os.cpu_count()} CPUs, "
                   f"{started:%Y-%m-%d %H:%M}")
        report.say(f"the folder's float32 weights: U-Net {sizes['unet'] / GB:.2f} GB, text encoder "
                   f"{sizes['text_encoder'] / GB:.2f} GB, VAE {sizes['vae'] / GB:.2f} GB, "
                   f"{sum(sizes.values()) / GB:.2f} GB in all")
        report.say("GB = 10⁹ bytes; target: peak resident memory < 4.0 GB; each run a fresh process; peak = the "
                   "largest of ru_maxrss and VmHWM")
        peaks: dict[str, list[int | None]] = {}

        def measure(key: str, label: str, once) -> None:
            """``once(label)`` ``--repeats`` times, each in a fresh process; their peaks go to ``peaks[key]``."""
            peaks[key] = []
            for i in range(args.repeats):
                peaks[key].append(once(label if args.repeats == 1 else f"{label}, run {i + 1} of {args.repeats}"))

        def child(kind: str):
            return lambda label: say_child(report, label, run_process([*me, kind]))

        report.say("\n(c) baselines, nothing of SD loaded")
        measure("baseline", "notebook 10's imports", child("baseline"))
        measure("cli-imports", "the CLI's imports", child("cli-imports"))
        report.say("\n(a) notebook 10's section 6, staged, in a fresh process")
        measure("staged", "notebook 10's section 6", child("staged"))
        if args.kernel:
            report.say("\n(a') the same in a fresh Jupyter kernel")
            measure("kernel", "notebook 10's section 6 in a kernel",
                    lambda label: say_child(report, label, run_in_kernel(folder, args.steps, args.size)))
        report.say("\n(b) the command line")
        cli = ["python", "-m", "sdlearn", "generate", "a photograph of an astronaut riding a horse", "--diffusers",
               str(folder), "--height", str(args.size), "--width", str(args.size), "--steps", str(args.steps),
               "--n", "2", "--seed", str(SEED), "--out"]
        report.say(f"    {' '.join(cli).replace(str(folder), 'FOLDER')} GRID.png")

        def run_cli(label: str) -> int | None:
            with tempfile.TemporaryDirectory() as scratch:
                grid = str(Path(scratch) / "grid.png")
                run = run_process([sys.executable, *cli[1:], grid])
                wrote = Path(grid).is_file()
            if run["code"] != 0 or not wrote:
                report.say(f"  {label}: FAILED (exit {run['code']}, grid written: {wrote}): "
                           f"{run['stderr'].strip().splitlines()[-3:]}")
                return None
            peak = max(run["ru_maxrss"], run["VmHWM"] or 0)
            report.say(f"  {label}: peak {peak / GB:.2f} GB ({peak:,} bytes; ru_maxrss {gb(run['ru_maxrss'])}, VmHWM "
                       f"{gb(run['VmHWM'])}) → {verdict(peak)}  [{run['seconds']:.0f} s]")
            return peak

        measure("cli", "the CLI", run_cli)
        report.say("\n(b') what the CLI runs, sdlearn's SDPipeline with low_memory=True, stage by stage")
        measure("low-memory", "low-memory SDPipeline", child("low-memory-pipeline"))
        report.say("\n(e) the same with the U-Net in float32 (storage_dtype='float32'), for comparison (no target)")
        measure("float32", "low-memory SDPipeline, float32 U-Net", child("low-memory-float32"))
        if args.diffusers_pipeline:
            report.say("\n(d) diffusers' StableDiffusionPipeline, for comparison (no target)")
            measure("diffusers", "diffusers' pipeline", child("diffusers-pipeline"))
        report.say(f"\nsummary (peak resident memory of fresh processes, the largest of {args.repeats} run(s), each "
                   f"run's in brackets; target < 4.0 GB):")
        names = {"baseline": "(c) notebook 10's imports", "cli-imports": "(c) the CLI's imports",
                 "staged": "(a) notebook 10's section 6", "kernel": "(a') the same in a Jupyter kernel",
                 "cli": "(b) python -m sdlearn generate --diffusers",
                 "low-memory": "(b') load_diffusers_pipeline(low_memory=True)", "diffusers": "(d) diffusers' pipeline",
                 "float32": "(e) (b') with a float32 U-Net"}
        for key, runs in peaks.items():
            if None in runs:
                report.say(f"    {names[key]:48} failed")
                continue
            peak = max(runs)
            report.say(f"    {names[key]:48} {peak / GB:.2f} GB ({peak / 2**30:.2f} GiB)"
                       + (f" [{', '.join(f'{r / GB:.2f}' for r in runs)}]" if len(runs) > 1 else "")
                       + ("" if key in ("baseline", "cli-imports", "diffusers", "float32") else
                          f"  {'met' if peak < TARGET_BYTES else 'MISSED'}"))
        report.say(f"\ntotal {time.perf_counter() - clock:.0f} s")
    finally:
        if not reused and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
            print(f"deleted {folder}")
        elif not reused:
            print(f"kept {folder} (--keep): delete it when done")
    if args.out is None:
        return None
    return report.write(results_dir / (args.out or f"sd_memory-{started:%Y%m%d-%H%M}.txt"))


if __name__ == "__main__":
    main()
