"""Your own captioned images, end to end (issue 19, item 6): ``python -m sdlearn train all --data FOLDER`` trains
the VAE, a text tower with the captions' vocabulary and the denoiser; ``generate --weights OUT`` answers prompts in
that vocabulary. Also ``train --precision`` (item 5) and the tokenizer a text tower's file carries."""

from __future__ import annotations

import json
import os
import shutil
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from sdlearn import __main__ as cli
from sdlearn import recipes
from sdlearn.checkpoint import WEIGHTS_DIR, CheckpointError
from sdlearn.data import VOCABULARY
from sdlearn.own_data import (
    MAX_TOKENS,
    SKIPPED_FOR_A_FOLDER,
    caption_groups,
    caption_vocabulary,
    folder_clip_batch_fn,
    folder_pixels,
    folder_tokenizer,
    read_captioned_folder,
    train_all_on_folder,
)
from sdlearn.pretrained import load_clip, load_pipeline, load_tokenizer
from sdlearn.text import Tokenizer
from sdlearn.training import shut_down_distributed

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
KINDS = ("stripe", "block", "dot")


def write_folder(folder: Path, n: int = 18, captions: dict[str, str] | None = None) -> Path:
    """``n`` tiny PNGs of coloured blocks, stripes and dots (16×16, so the dataset resizes them), captioned "a green
    stripe" and so on in ``captions.jsonl``; ``captions`` replaces some of those captions (None: leave it out)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        color, kind = list(COLORS)[i % len(COLORS)], KINDS[(i // len(COLORS)) % len(KINDS)]
        pixels = np.zeros((16, 16, 3), np.uint8)
        region = {"stripe": np.s_[6:10, :], "block": np.s_[3:13, 3:13], "dot": np.s_[7:10, 7:10]}[kind]
        pixels[region] = COLORS[color]
        pixels[i % 16, (3 * i) % 16] = 255  # no two images alike
        name = f"img{i:02d}.png"
        Image.fromarray(pixels).save(folder / name)
        caption = f"a {color} {kind}"
        if captions is not None and name in captions:
            caption = captions[name]
            if caption is None:
                continue
        lines.append(json.dumps({"file": name, "caption": caption}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


# ------------------------------------------------------------------------------------------------------------
# End to end, through the command line


def test_train_all_on_a_captioned_folder_then_generate_in_its_vocabulary(tmp_path, capsys, monkeypatch):
    folder, out = write_folder(tmp_path / "mine"), tmp_path / "out"
    precisions = []
    real_train = recipes.train

    def spy(*args, **kwargs):  # every stage's training loop, as fit calls it
        precisions.append((kwargs["desc"], kwargs["precision"]))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(recipes, "train", spy)
    code = cli.main(["train", "all", "--data", str(folder), "--steps", "2", "--out", str(out), "--device", "cpu",
                     "--precision", "bf16"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert precisions == [("train vae", "bf16"), ("train clip", "bf16"), ("train denoiser", "bf16")]
    assert SKIPPED_FOR_A_FOLDER in printed.out  # the Shapes-only stages are skipped, in one line
    assert [line for line in printed.out.splitlines() if "skipped" in line] == [
        f"train all --data {folder}: 18 images, 8 words; {SKIPPED_FOR_A_FOLDER}"]
    for name in ("vae", "clip", "denoiser"):
        assert (out / f"{name}.safetensors").is_file() and (out / f"{name}.json").is_file()
        assert json.loads((out / f"{name}.json").read_text())["training"]["precision"] == "bf16"
    assert not (out / "scene_reader.safetensors").exists()
    record = json.loads((out / "train_all.json").read_text())
    assert record["data"] == str(folder) and record["images"] == 18 and record["skipped"] == SKIPPED_FOR_A_FOLDER
    assert {name: stage["steps"] for name, stage in record["stages"].items()} == {"vae": 2, "clip": 2, "denoiser": 2}

    # the vocabulary is saved with the text tower, and loading restores it
    words = ["a", "block", "blue", "dot", "green", "red", "stripe", "yellow"]
    assert json.loads((out / "clip.json").read_text())["tokenizer"] == {"vocabulary": words, "max_length": 5}
    assert load_tokenizer(out).vocabulary == words
    assert load_clip(out).config.text.vocab_size == 4 + len(words)
    pipe = load_pipeline(out)
    assert pipe.tokenizer.vocabulary == words
    assert json.loads((out / "denoiser.json").read_text())["text_encoder"]["source"] == str(out / "clip.safetensors")

    grid = tmp_path / "green.png"
    assert cli.main(["generate", "a green stripe", "--weights", str(out), "--out", str(grid), "--steps", "2"]) == 0
    printed = capsys.readouterr()
    assert "warning" not in printed.err  # every word known
    with Image.open(grid) as picture:
        assert picture.size[0] >= 32 and picture.mode == "RGB"
    assert cli.main(["generate", "a purple stripe", "--weights", str(out), "--out-dir", str(tmp_path / "purple"),
                     "--steps", "2"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and "'purple'" in warned[0] and "became <unk>" in warned[0]
    assert (tmp_path / "purple" / "000.png").is_file()


# ------------------------------------------------------------------------------------------------------------
# Bad folders: one line, exit 2, nothing written


def _no_images(folder: Path) -> None:
    folder.mkdir()
    (folder / "captions.jsonl").write_text("")


def _no_captions_file(folder: Path) -> None:
    write_folder(folder, 4)
    (folder / "captions.jsonl").unlink()


@pytest.mark.parametrize(
    "make, words",
    [
        (_no_images, "no images"),
        (_no_captions_file, "captions file"),
        (lambda f: write_folder(f, 4, {"img02.png": None}), "1 image(s) have no caption"),
        (lambda f: write_folder(f, 4, {"img01.png": "  "}), "the caption of 'img01.png' is empty"),
        (lambda f: write_folder(f, 4, {"img03.png": "42 !"}), "the caption of 'img03.png' is '42 !', which has no word"),
        (lambda f: write_folder(f, 4, {"img00.png": "big " * (MAX_TOKENS - 1)}),
         f"the caption of 'img00.png' has {MAX_TOKENS - 1} words, more than the {MAX_TOKENS - 2} that fit"),
        (lambda f: write_folder(f, 1), "holds 1 image"),
        (lambda f: None, "does not exist"),
    ],
    ids=["no-images", "no-captions-file", "a-caption-missing", "empty-caption", "no-words", "too-long", "one-image",
         "no-folder"],
)
def test_a_bad_folder_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys, make, words):
    folder, out = tmp_path / "mine", tmp_path / "out"
    make(folder)
    assert cli.main(["train", "all", "--data", str(folder), "--steps", "1", "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m sdlearn train: error: ") and len(err.strip().splitlines()) == 1, err
    assert words in err
    assert not out.exists()


@pytest.mark.parametrize("model, words", [("classifier", "reads Shapes scenes only"),
                                          ("scene_reader", "reads Shapes scenes only"),
                                          ("denoiser", "use 'train all --data FOLDER'")])
def test_data_with_a_model_that_cannot_use_a_folder_is_refused(tmp_path, capsys, model, words):
    folder = write_folder(tmp_path / "mine", 4)
    assert cli.main(["train", model, "--data", str(folder), "--steps", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err and "'train vae', 'train clip' and 'train all'" in err


# ------------------------------------------------------------------------------------------------------------
# --precision


def test_precision_is_a_choice_of_fp32_or_bf16(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.build_parser().parse_args(["train", "vae", "--precision", "fp16"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--precision: invalid choice: 'fp16'" in err and "bf16" in err and len(err.strip().splitlines()) == 1
    assert cli.build_parser().parse_args(["train", "vae"]).precision == "fp32"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--help"])
    train_help = " ".join(capsys.readouterr().out.split())
    assert "--precision {fp32,bf16}" in train_help and "meant for CUDA GPUs" in train_help


@pytest.mark.parametrize("model", sorted(cli.TRAINERS))
def test_every_train_command_passes_the_precision_to_its_recipe(tmp_path, monkeypatch, model):
    seen = {}
    monkeypatch.setitem(cli.TRAINERS, model, lambda **kwargs: seen.update(kwargs))
    assert cli.main(["train", model, "--precision", "bf16", "--out", str(tmp_path)]) == 0
    assert seen["precision"] == "bf16"
    seen.clear()
    assert cli.main(["train", model, "--out", str(tmp_path)]) == 0
    assert "out_dir" in seen and "precision" not in seen  # the recipe's default: fp32


def test_a_recipe_trains_and_records_in_bf16(tmp_path, monkeypatch):
    seen = []
    real_train = recipes.train
    monkeypatch.setattr(recipes, "train", lambda *a, **k: seen.append(k["precision"]) or real_train(*a, **k))
    folder, out = write_folder(tmp_path / "mine", 4), tmp_path / "out"
    vae, _ = recipes.train_vae(out, steps=1, device="cpu", batch_size=8, data=folder, precision="bf16", progress=False)
    assert seen == ["bf16"] and vae.training_info["precision"] == "bf16"
    assert json.loads((out / "vae.json").read_text())["training"]["precision"] == "bf16"


# ------------------------------------------------------------------------------------------------------------
# The pieces


def test_the_vocabulary_tokenizer_and_contrastive_batches_of_a_folder(tmp_path):
    folder = write_folder(tmp_path / "mine", 8, {"img04.png": "A red STRIPE!", "img05.png": "a green, dot"})
    dataset = read_captioned_folder(folder)
    assert caption_vocabulary(["A red STRIPE!", "a green, dot", "red"]) == ["a", "dot", "green", "red", "stripe"]
    tokenizer = folder_tokenizer(dataset)
    assert tokenizer.vocabulary == ["a", "block", "blue", "dot", "green", "red", "stripe", "yellow"]
    assert tokenizer.max_length == 5  # the longest caption, 3 words, with <bos> and <eos>
    # "a red stripe" (img00) and "A red STRIPE!" (img04) are the same words: one group
    assert caption_groups([dataset.captions[f] for f in dataset.files]).tolist() == [0, 1, 2, 3, 0, 4, 5, 6]
    pixels = folder_pixels(dataset)
    assert pixels.dtype == torch.uint8 and pixels.shape == (8, 3, 32, 32)
    assert torch.equal(pixels[0].float() / 127.5 - 1, dataset[0]["image"])  # exact
    captions = [dataset.captions[f] for f in dataset.files]
    batch = folder_clip_batch_fn(pixels, captions, tokenizer, 8, seed=0)(3)
    assert batch["images"].shape == (8, 3, 32, 32) and batch["ids"].shape == (8, 5)
    assert batch["positives"].sum() == 8 + 2  # the diagonal, and the two captions of the same words
    assert torch.equal(batch["positives"], batch["positives"].T) and batch["positives"].diagonal().all()
    again = folder_clip_batch_fn(pixels, captions, tokenizer, 8, seed=0)(3)
    assert all(torch.equal(batch[k], again[k]) for k in batch)  # a pure function of (seed, step)


def test_own_vocabulary_makes_no_claim_about_shapes_scenes_and_lists_few_known_words():
    own = Tokenizer(["a", "and", "cat", "dog", "bird"], max_length=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        own("a cat and a dog and a bird")  # three things: fine in your own captions
    with pytest.warns(UserWarning, match="names 3 objects"):
        Tokenizer()("a red circle and a blue square and a green triangle")  # the Shapes vocabulary still warns
    big = Tokenizer([f"w{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(100)], max_length=5)
    with pytest.warns(UserWarning) as record:
        big("zebra")
    message = str(record[0].message)
    assert "'zebra'" in message and message.endswith("... (100 words in all)") and "wdv" not in message


def _copy_shipped_clip(folder: Path, edit) -> Path:
    folder.mkdir()
    shutil.copy(WEIGHTS_DIR / "clip.safetensors", folder / "clip.safetensors")
    info = json.loads((WEIGHTS_DIR / "clip.json").read_text())
    edit(info)
    (folder / "clip.json").write_text(json.dumps(info))
    return folder


def test_a_text_tower_file_without_a_tokenizer_gets_the_shapes_vocabulary(tmp_path):
    old = _copy_shipped_clip(tmp_path / "old", lambda info: info.pop("tokenizer"))
    tokenizer = load_tokenizer(old)
    assert tokenizer.vocabulary == list(VOCABULARY) and tokenizer.max_length == load_tokenizer().max_length

    def other_size(info):
        info.pop("tokenizer")
        info["model_config"]["text"]["vocab_size"] = 50

    with pytest.raises(CheckpointError, match=r"records no tokenizer, and its text tower has 50 tokens, not the 44"):
        load_tokenizer(_copy_shipped_clip(tmp_path / "other", other_size))
    with pytest.raises(CheckpointError, match=r"holds no usable tokenizer: a tokenizer is stored as"):
        load_tokenizer(_copy_shipped_clip(tmp_path / "damaged", lambda info: info.update(tokenizer="words")))


# ------------------------------------------------------------------------------------------------------------
# Under torchrun: two processes (gloo) train the folder together; rank 0 writes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_trains_all(rank: int, folder: str, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    _, result = train_all_on_folder(folder, out, steps=1, device="cpu", progress=False)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result.record["stages"]))
    shut_down_distributed()


@pytest.mark.slow  # two processes each training three models
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_train_all_on_a_folder_under_two_processes(tmp_path):
    folder, out = write_folder(tmp_path / "mine", 8), tmp_path / "out"
    mp.spawn(_rank_trains_all, args=(str(folder), str(out), _free_port()), nprocs=2, join=True)
    stages = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [{k: v["steps"] for k, v in s.items()} for s in stages] == [{"vae": 1, "clip": 1, "denoiser": 1}] * 2
    assert load_tokenizer(out).vocabulary == caption_vocabulary([f"a {c} {k}" for c in COLORS for k in KINDS[:2]])
    assert json.loads((out / "train_all.json").read_text())["images"] == 8
    assert load_pipeline(out)("a blue block", num_inference_steps=2, seed=0, progress=False).shape == (1, 3, 32, 32)
