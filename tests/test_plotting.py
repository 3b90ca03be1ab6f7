"""Plotting: tensors → pixels, grids with captions, schedule plots, noising rows, trajectories."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from sdlearn.plotting import (  # noqa: E402
    image_grid,
    plot_schedules,
    save_image_grid,
    show_images,
    show_noising,
    show_trajectory,
    to_image,
)
from sdlearn.schedules import NoiseSchedule  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _images(n, h=8, w=8, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _shown(ax):
    return ax.images[0].get_array()


def test_to_image_maps_minus_one_one_to_zero_one_and_clips():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0, -5.0]).reshape(1, 1, 5).expand(3, 1, 5)
    out = to_image(x)
    assert out.shape == (1, 5, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0], [0.0, 0.5, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(to_image(torch.zeros(1, 4, 4)), np.full((4, 4, 3), 0.5))  # grey → RGB
    assert to_image(_images(1)).shape == (8, 8, 3)  # a batch of one
    with pytest.raises(ValueError, match=r"\[3, H, W\].*got shape \[2, 3, 8, 8\]"):
        to_image(_images(2))


def test_show_images_lays_out_a_grid_with_captions():
    images = _images(5)
    fig = show_images(images, captions=[f"a small red circle number {i} in the top left" for i in range(5)], ncols=3, title="five")
    assert isinstance(fig, Figure)
    axes = fig.axes
    assert len(axes) == 6  # 2 rows × 3 columns, the last cell empty
    shown = [ax for ax in axes if ax.images]
    assert len(shown) == 5 and not axes[5].images
    for i, ax in enumerate(shown):
        np.testing.assert_allclose(_shown(ax), to_image(images[i]))
        assert ax.get_title().replace("\n", " ") == f"a small red circle number {i} in the top left"
        assert "\n" in ax.get_title()  # wrapped
        assert not ax.axison
    assert fig._suptitle.get_text() == "five"
    assert len(show_images(list(images[:2])).axes) == 2  # a list of images, one row
    with pytest.raises(ValueError, match="2 images but 3 captions"):
        show_images(images[:2], captions=["a", "b", "c"])


def test_image_grid_places_each_image_with_padding():
    images = _images(5, h=4, w=6)
    grid = image_grid(images, nrow=3, padding=2, pad_value=1.0)
    assert grid.shape == (3, 2 * (4 + 2) + 2, 3 * (6 + 2) + 2)
    for i in range(5):
        r, c = divmod(i, 3)
        top, left = 2 + r * 6, 2 + c * 8
        torch.testing.assert_close(grid[:, top : top + 4, left : left + 6], images[i])
    assert (grid[:, :2] == 1).all() and (grid[:, 8:, 20:] == 1).all()  # padding and the empty sixth cell
    with pytest.raises(ValueError, match="same height and width"):
        image_grid([torch.zeros(3, 4, 4), torch.zeros(3, 5, 4)])


def test_save_image_grid_writes_a_png_with_the_right_pixels(tmp_path):
    images = torch.stack([torch.full((3, 4, 4), -1.0), torch.full((3, 4, 4), 1.0)])
    path = save_image_grid(images, tmp_path / "grid.png", nrow=2, padding=1, upscale=2)
    pixels = np.asarray(Image.open(path))
    assert pixels.shape == (2 * (4 + 2), 2 * (2 * 5 + 1), 3)
    assert (pixels[2:10, 2:10] == 0).all() and (pixels[2:10, 12:20] == 255).all()


def test_plot_schedules_draws_one_panel_per_quantity_and_a_legend():
    schedules = {
        "scaled-linear": NoiseSchedule.from_name("scaled_linear"),
        "cosine, T=50": NoiseSchedule.from_name("cosine", num_train_timesteps=50),
        "zero SNR": NoiseSchedule.from_name("scaled_linear", zero_terminal_snr=True),
    }
    fig = plot_schedules(schedules, what=("betas", "alphas_cumprod", "signal_noise", "snr", "log_snr"))
    assert len(fig.axes) == 5
    betas_ax, abar_ax, sn_ax, snr_ax, logsnr_ax = fig.axes
    assert [t.get_text() for t in betas_ax.get_legend().get_texts()] == list(schedules)
    np.testing.assert_allclose(abar_ax.lines[1].get_ydata(), schedules["cosine, T=50"].alphas_cumprod.numpy(), rtol=1e-6)
    assert len(sn_ax.lines) == 6  # √ᾱ and √(1−ᾱ) for each schedule
    assert snr_ax.get_yscale() == "log"
    np.testing.assert_allclose(logsnr_ax.lines[0].get_ydata(), schedules["scaled-linear"].log_snr().numpy(), rtol=1e-4)
    assert np.isneginf(logsnr_ax.lines[2].get_ydata()[-1])  # zero terminal SNR
    fig = plot_schedules(schedules, what="alphas_cumprod", relative_time=True)
    assert fig.axes[0].lines[1].get_xdata()[-1] == pytest.approx(49 / 50)
    assert len(plot_schedules(NoiseSchedule.from_name("linear")).axes) == 4  # a single schedule
    with pytest.raises(ValueError, match="unknown quantity.*choose from betas"):
        plot_schedules(schedules, what=("alpha",))


def test_plot_schedules_draws_into_given_axes():
    fig, axes = plt.subplots(1, 2)
    assert plot_schedules({"linear": torch.linspace(1e-4, 0.02, 100)}, what=("betas", "snr"), axes=axes) is fig
    assert len(axes[0].lines) == 1 and len(axes[1].lines) == 1


def test_show_noising_uses_the_closed_form_with_one_noise():
    schedule = NoiseSchedule.from_name("linear")
    image = _images(1)[0]
    fig = show_noising(image, schedule, [0, 500, 999], generator=torch.Generator().manual_seed(3))
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(3))
    assert len(fig.axes) == 3
    for ax, t in zip(fig.axes, [0, 500, 999]):
        np.testing.assert_allclose(_shown(ax), to_image(schedule.add_noise(image, noise, t)), atol=1e-6)
        assert ax.get_title() == f"t={t}, ᾱ={schedule.alphas_cumprod[t].item():.3g}"
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\)"):
        show_noising(image, schedule, [1000])


def test_show_trajectory_has_one_row_per_sample_and_labels_on_top():
    xs = [_images(2, seed=s) for s in range(4)]
    fig = show_trajectory(xs, labels=["t=999", "t=500", "t=100", "t=0"])
    assert len(fig.axes) == 8
    np.testing.assert_allclose(_shown(fig.axes[5]), to_image(xs[1][1]))  # row 1 (second sample), column 1
    assert [ax.get_title() for ax in fig.axes[:4]] == ["t=999", "t=500", "t=100", "t=0"]
    assert all(ax.get_title() == "" for ax in fig.axes[4:])
    assert len(show_trajectory([x[0] for x in xs]).axes) == 4  # single images: one row
    with pytest.raises(ValueError, match="same number of images"):
        show_trajectory([_images(2), _images(3)])
    with pytest.raises(ValueError, match="4 snapshots but 1 labels"):
        show_trajectory(xs, labels=["x"])


def test_show_images_writes_one_label_left_of_each_row():
    images = torch.zeros(6, 3, 32, 32)
    fig = show_images(images, ncols=3, row_labels=["guidance 1", "guidance 4"])
    first_column = [ax for ax in fig.axes if ax.get_ylabel()]
    assert [ax.get_ylabel() for ax in first_column] == ["guidance 1", "guidance 4"]
    plt.close(fig)
    fig = show_images(images[:3], ncols=3, row_labels=["a red circle\nw = 4"])
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()] == ["a red circle\nw = 4"]  # the break is kept
    plt.close(fig)
    with pytest.raises(ValueError, match="2 rows"):
        show_images(images, ncols=3, row_labels=["only one"])
