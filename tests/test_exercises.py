"""Exercises: solution stripping, student copies, and the checkers (each must pass its reference, reject its mistakes)."""

import math

import nbformat
import pytest
import torch

from sdlearn import exercises
from sdlearn.data import split_words
from sdlearn.exercises import (
    CHECKERS,
    STUB,
    STUB_COMMENT,
    Case,
    ExerciseFailed,
    ExerciseNotDone,
    check,
    find_solution_regions,
    make_student_copy,
    strip_solutions,
    write_student_copies,
)

# -- strip_solutions --------------------------------------------------------------------------------
CELL = '''import torch

def add_noise(x0, noise, t, alphas_cumprod):
    """Docstring stays."""
    # BEGIN SOLUTION
    a = alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise
    # END SOLUTION

# BEGIN SOLUTION
secret_top_level = 42
# END SOLUTION
check_add_noise(add_noise)
'''


def test_strip_solutions_removes_every_solution_line_and_only_those():
    out = strip_solutions(CELL)
    for secret in ("alphas_cumprod[t].reshape", "a.sqrt() * x0", "secret_top_level", "BEGIN SOLUTION", "END SOLUTION"):
        assert secret not in out
    kept = ["import torch", "def add_noise(x0, noise, t, alphas_cumprod):", '    """Docstring stays."""',
            "check_add_noise(add_noise)"]
    for line in kept:
        assert line in out.splitlines()
    # stubs at the BEGIN marker's indentation: inside the function, and at top level
    assert out.splitlines().count("    " + STUB) == 1 and out.splitlines().count(STUB) == 1
    assert out.splitlines().count("    " + STUB_COMMENT) == 1 and out.splitlines().count(STUB_COMMENT) == 1
    assert out.endswith("\n")
    # the stubbed cell is valid Python, and the function now raises NotImplementedError
    namespace = {"check_add_noise": lambda fn: None}
    with pytest.raises(NotImplementedError):
        exec(out, namespace)  # the top-level stub raises
    function_part = out.split("# YOUR CODE HERE\nraise")[0]
    exec(function_part, namespace)
    with pytest.raises(NotImplementedError, match="Exercise: fill this in"):
        namespace["add_noise"](None, None, None, None)


def test_strip_solutions_leaves_cells_without_markers_unchanged():
    source = "x = 1\n# a comment about solutions\nprint(x)"
    assert strip_solutions(source) == source
    assert find_solution_regions(CELL) == [(4, 7), (9, 11)]


@pytest.mark.parametrize("source, words", [
    ("# BEGIN SOLUTION\nx = 1\n", "never closed"),
    ("x = 1\n# END SOLUTION\n", "without a '# BEGIN SOLUTION'"),
    ("# BEGIN SOLUTION\n  # BEGIN SOLUTION\nx\n# END SOLUTION\n# END SOLUTION\n", "cannot nest"),
    ("x = 1  # BEGIN SOLUTION\n", "alone on its line"),
])
def test_unbalanced_or_nested_markers_name_the_cell_and_line(source, words):
    with pytest.raises(ValueError, match=words) as info:
        strip_solutions(source, where="01_forward_noising.ipynb, cell 7")
    assert "01_forward_noising.ipynb, cell 7, line" in str(info.value)


# -- student copies ---------------------------------------------------------------------------------
def _notebook(path, cells, minor=5):
    nb = nbformat.v4.new_notebook()
    nb.nbformat_minor = minor
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, source in cells:
        if kind == "code":
            cell = nbformat.v4.new_code_cell(source, execution_count=3,
                                             outputs=[nbformat.v4.new_output("stream", text="secret output 42\n")])
        else:
            cell = nbformat.v4.new_markdown_cell(source)
        if minor < 5:
            cell.pop("id", None)
        nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


CELLS = [
    ("markdown", "# Forward noising\nSome maths."),
    ("code", "import torch\nx = torch.ones(3)\nx"),
    ("code", "def double(x):\n    # BEGIN SOLUTION\n    return 2 * x\n    # END SOLUTION"),
    ("code", "check_double(double)"),
    ("code", "print('after the exercise')"),
]


@pytest.mark.parametrize("minor", [4, 5])
def test_make_student_copy_clears_outputs_stubs_solutions_and_tags_exercises(tmp_path, minor):
    src = _notebook(tmp_path / "01_demo.ipynb", CELLS, minor)
    dst = make_student_copy(src, tmp_path / "student.ipynb")
    nb = nbformat.read(dst, as_version=4)
    nbformat.validate(nb)
    text = dst.read_text()
    assert "secret output 42" not in text and "return 2 * x" not in text
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert [c.source for c in code] == [
        "import torch\nx = torch.ones(3)\nx",
        f"def double(x):\n    {STUB_COMMENT}\n    {STUB}",
        "check_double(double)",
        "print('after the exercise')",
    ]
    tags = [c.metadata.get("tags", []) for c in code]
    assert tags == [[], ["raises-exception"], ["raises-exception"], []]
    # guidance inserted right before the first exercise, since the notebook had none
    kinds = [c.cell_type for c in nb.cells]
    assert kinds == ["markdown", "code", "markdown", "code", "code", "code"]
    assert "How to check your answer" in nb.cells[2].source
    # the source notebook is untouched
    assert "return 2 * x" in src.read_text() and "secret output 42" in src.read_text()


def test_only_exercise_and_checker_cells_are_tagged(tmp_path):
    cells = [("code", "def check_mine(fn):\n    return fn(2) == 4"), ("code", "x = 1\nexercises.check_log_snr(my_log_snr)"),
             ("code", "print('checking')")]
    nb = nbformat.read(make_student_copy(_notebook(tmp_path / "03_demo.ipynb", cells), tmp_path / "s.ipynb"), as_version=4)
    assert [c.metadata.get("tags", []) for c in nb.cells] == [[], ["raises-exception"], []]
    assert len(nb.cells) == 3  # no exercise, so no guidance cell


def test_existing_guidance_is_kept_not_duplicated(tmp_path):
    cells = [("markdown", "## How to check your answer\nRun the check cell.")] + CELLS[1:]
    dst = make_student_copy(_notebook(tmp_path / "02_demo.ipynb", cells), tmp_path / "s.ipynb")
    nb = nbformat.read(dst, as_version=4)
    assert sum("how to check your answer" in c.source.lower() for c in nb.cells) == 1


def test_student_copies_drop_the_rubric_cells_and_keep_every_other_cell(tmp_path):
    cells = CELLS + [("markdown", "### Exercise 2 (experiment): a sweep\nHypothesis: it rises."),
                     ("code", "print('measured')"),
                     ("markdown", "**Rubric (teacher's copy only).** Secret grading notes."),
                     ("markdown", "## Recap")]
    src = _notebook(tmp_path / "01_demo.ipynb", cells)
    nb = nbformat.read(src, as_version=4)
    nb.cells[7].metadata["tags"] = ["rubric"]
    nbformat.write(nb, src)
    copy = nbformat.read(make_student_copy(src, tmp_path / "student.ipynb"), as_version=4)
    assert "Secret grading notes" not in (tmp_path / "student.ipynb").read_text()
    # the rubric cell is gone, every other cell of the course is there in order (plus the guidance cell)
    kept = [c.source for c in copy.cells if "How to check your answer" not in c.source]
    assert [c.cell_type for c in copy.cells if "How to check your answer" not in c.source] == [
        c.cell_type for i, c in enumerate(nb.cells) if i != 7]
    assert kept[5:] == ["### Exercise 2 (experiment): a sweep\nHypothesis: it rises.", "print('measured')", "## Recap"]


def test_make_student_copy_refuses_to_overwrite_its_source(tmp_path):
    src = _notebook(tmp_path / "01_demo.ipynb", CELLS)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        make_student_copy(src, tmp_path / "." / "01_demo.ipynb")


def test_broken_markers_in_a_notebook_name_the_notebook_and_cell(tmp_path):
    course = tmp_path / "course"
    course.mkdir()
    _notebook(course / "01_a.ipynb", CELLS)
    _notebook(course / "02_b.ipynb", CELLS[:2] + [("code", "# BEGIN SOLUTION\nx = 1")])
    with pytest.raises(ValueError, match=r"02_b\.ipynb, cell 3, line 1"):
        write_student_copies(tmp_path / "out", notebooks_dir=course)
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.fixture
def course(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _notebook(folder / "01_first.ipynb", CELLS)
    _notebook(folder / "02_second.ipynb", CELLS)
    _notebook(folder / "scratch.ipynb", CELLS)  # not a course notebook (no NN_ prefix)
    (folder / "notes.txt").write_text("not a notebook")
    return folder


def test_write_student_copies_writes_only_course_notebooks_in_order(tmp_path, course):
    written = write_student_copies(tmp_path / "class", notebooks_dir=course)
    assert [p.name for p in written] == ["01_first.ipynb", "02_second.ipynb"]
    assert sorted(p.name for p in (tmp_path / "class").iterdir()) == ["01_first.ipynb", "02_second.ipynb"]
    for path in written:
        sources = [c.source for c in nbformat.read(path, as_version=4).cells]
        assert any(STUB in s for s in sources) and not any("return 2 * x" in s for s in sources)


def test_write_student_copies_refuses_a_non_empty_folder_unless_forced(tmp_path, course):
    out = tmp_path / "class"
    out.mkdir()
    (out / "homework.txt").write_text("mine")
    (out / "01_first.ipynb").write_text("old copy")
    with pytest.raises(FileExistsError, match="not empty.*--force"):
        write_student_copies(out, notebooks_dir=course)
    assert (out / "01_first.ipynb").read_text() == "old copy"
    written = write_student_copies(out, notebooks_dir=course, force=True)
    assert len(written) == 2 and "NotImplementedError" in (out / "01_first.ipynb").read_text()
    assert (out / "homework.txt").read_text() == "mine"  # other files are left alone
    write_student_copies(tmp_path / "empty_is_fine", notebooks_dir=course)


@pytest.mark.parametrize("inside", [".", "students", "students/deeper"])
def test_write_student_copies_never_writes_into_the_course_folder(course, inside):
    before = {p.name: p.read_bytes() for p in course.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="course's own notebooks folder"):
        write_student_copies(course / inside, notebooks_dir=course, force=True)
    assert {p.name: p.read_bytes() for p in course.iterdir() if p.is_file()} == before
    assert not (course / "students").exists()


def test_write_student_copies_explains_missing_notebooks(tmp_path):
    with pytest.raises(FileNotFoundError, match="no notebooks folder"):
        write_student_copies(tmp_path / "out", notebooks_dir=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no NN_\*\.ipynb"):
        write_student_copies(tmp_path / "out", notebooks_dir=tmp_path / "empty")


def test_default_notebooks_dir_is_the_repositorys():
    assert exercises.default_notebooks_dir().name == "notebooks"
    assert (exercises.default_notebooks_dir().parent / "sdlearn" / "exercises" / "__init__.py").is_file()


# -- the checker framework ----------------------------------------------------------------------------
def _cases():
    return [Case("x = [1, 2, 3]", (torch.tensor([1.0, 2.0, 3.0]),)), Case("x = [[0, 1], [2, 3]]", (torch.arange(4.0).reshape(2, 2),))]


def _square(x):
    return x**2


def test_check_prints_success_and_returns_none(capsys):
    assert check(lambda x: x * x, _square, _cases(), name="check_square") is None
    assert "✓ Correct! check_square passed 2 cases." in capsys.readouterr().out


@pytest.mark.parametrize("fn, case, words", [
    (lambda x: None, 1, "is None: did you forget to `return`"),
    (lambda x: (x**2).flatten(), 2, "expected shape [2, 2], your result has shape [4]"),
    (lambda x: (x**2).long(), 1, "expected dtype torch.float32"),
    (lambda x: (x**2).numpy(), 1, "expected a torch.Tensor, your result is a ndarray"),
    (lambda x: x**2 / (x - 2) * (x - 2), 1, "1 NaN value(s) where the answer has none (the first at index (1), where 4 was expected)"),
    (lambda x: x**2 + (x == 3), 1, "1 of 3 values differ; the largest difference is 1 at index (2): expected 9, got 10"),
    (lambda x: x**2 + (x == 0), 2, "1 of 4 values differ; the largest difference is 1 at index (0, 0): expected 0, got 1"),
    (lambda x: x.add_(0).pow_(2), 1, "changed its input number 1 in place"),
])
def test_check_explains_the_first_failing_case(fn, case, words):
    with pytest.raises(ExerciseFailed) as info:
        check(fn, _square, _cases(), name="check_square", hint="multiply x by itself")
    message = str(info.value)
    assert words in message
    assert f"check_square: case {case} of 2 failed." in message
    assert f"Inputs: {_cases()[case - 1].description}" in message and "Hint: multiply x by itself" in message


def test_check_reports_the_learners_exception_and_chains_it():
    def broken(x):
        return x @ torch.ones(5)

    with pytest.raises(ExerciseFailed, match=r"case 1 of 2 failed.*\n.*x = \[1, 2, 3\].*\n.*raised RuntimeError: ") as info:
        check(broken, _square, _cases(), name="check_square")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_an_unfinished_exercise_is_both_exercise_failed_and_not_implemented():
    def stub(x):
        raise NotImplementedError("Exercise: fill this in")

    with pytest.raises(ExerciseNotDone, match="Replace the `raise NotImplementedError") as info:
        check(stub, _square, _cases(), name="check_square")
    assert isinstance(info.value, NotImplementedError) and isinstance(info.value, AssertionError)


def test_check_explains_a_function_passed_by_its_result():
    with pytest.raises(ExerciseFailed, match="Pass the function itself"):
        check(torch.ones(3), _square, _cases(), name="check_square")


def test_numbers_and_infinities_compare_sensibly(capsys):
    cases = [Case("x = 0.5", (0.5,)), Case("x = 0", (0.0,))]
    log_ref = lambda x: torch.log(torch.tensor([x]))  # −inf at 0
    check(lambda x: torch.log(torch.tensor([x], dtype=torch.float64)), log_ref, cases, name="c")
    with pytest.raises(ExerciseFailed, match="case 2 of 2.*\n.*\n.*largest difference is inf"):
        check(lambda x: torch.log(torch.tensor([x + 1e-8])), log_ref, cases, name="c")
    check(lambda x: math.sqrt(x), math.sqrt, cases, name="c")
    with pytest.raises(ExerciseFailed, match="expected 0.707107, your result is 0.5"):
        check(lambda x: x, math.sqrt, cases, name="c")


# -- every registered checker ---------------------------------------------------------------------
def test_the_checkers_of_notebooks_01_and_02_are_registered():
    expected = {"check_alphas_cumprod", "check_add_noise", "check_x0_from_noise",
                "check_cosine_betas", "check_log_snr", "check_zero_terminal_snr"}
    assert expected <= set(CHECKERS)
    for name in CHECKERS:
        assert getattr(exercises, name) is CHECKERS[name]
        assert CHECKERS[name].signature in CHECKERS[name].__doc__


@pytest.mark.parametrize("name", sorted(CHECKERS))
def test_checker_passes_its_reference(name, capsys):
    assert CHECKERS[name](CHECKERS[name].reference) is None
    assert f"✓ Correct! {name} passed" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(CHECKERS))
def test_checker_rejects_each_mistake_with_a_helpful_message(name):
    checker = CHECKERS[name]
    assert len(checker.mistakes) >= 2
    descriptions = [case.description for case in checker.cases()]
    for mistake in checker.mistakes:
        with pytest.raises(ExerciseFailed) as info:
            checker(mistake.fn)
        message = str(info.value)
        assert any(f"Inputs: {d}" in message for d in descriptions), message
        assert "Problem: " in message and f"Hint: {checker.hint}" in message
        assert f"It looks like {mistake.explanation}" in message


@pytest.mark.parametrize("name", sorted(CHECKERS))
def test_checker_rejects_a_function_that_returns_nothing(name):
    with pytest.raises(ExerciseFailed, match="did you forget to `return`"):
        CHECKERS[name](lambda *args: None)


def _bcast(a, like):
    return a.reshape(-1, *([1] * (like.dim() - 1)))


def _alt_posterior_mean(x0, x_t, alpha_bar_t, alpha_bar_prev):
    a_t, a_prev = float(alpha_bar_t), float(alpha_bar_prev)  # python floats: the weights in double precision
    alpha_t = a_t / a_prev
    weight_x0 = math.sqrt(a_prev) * (1 - alpha_t) / (1 - a_t)
    weight_xt = math.sqrt(alpha_t) * (1 - a_prev) / (1 - a_t)
    return weight_x0 * x0 + weight_xt * x_t


def _alt_ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev, eta, noise):
    # x_prev as one coefficient on x_t and one on eps (x̂0 substituted in), computed in float64
    a, a_prev = alpha_bar_t.double(), alpha_bar_prev.double()
    sigma2 = eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    coef_x = (a_prev / a).sqrt()
    coef_eps = (1 - a_prev - sigma2).sqrt() - coef_x * (1 - a).sqrt()
    return (coef_x * x_t.double() + coef_eps * eps.double() + sigma2.sqrt() * noise.double()).float()


def _alt_heun_step(x, sigma, sigma_next, denoise):
    h = sigma_next - sigma
    slope = (x - denoise(x, sigma)) / sigma
    x_euler = x + h * slope
    if not sigma_next:
        return x_euler
    slope_next = (x_euler - denoise(x_euler, sigma_next)) / sigma_next
    return x_euler + h / 2 * (slope_next - slope)  # the Euler step, corrected by half the change of slope


def _alt_gaussian_kl(mean, logvar):
    m, lv = mean.double().flatten(1), logvar.double().flatten(1)  # [B, D]
    return (0.5 * (m.pow(2).sum(1) + lv.exp().sum(1) - lv.sum(1) - m.shape[1])).float()


def _alt_timestep_embedding(t, dim):
    half = dim // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)  # ω_i = 10000^(−i/half)
    args = t.double()[:, None] * freqs  # [B, half]
    return torch.cat([args.cos(), args.sin()], dim=1).float()


def _alt_attention(q, k, v):
    scores = torch.einsum("...nd,...md->...nm", q / math.sqrt(q.shape[-1]), k)
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))  # a softmax written out, stabilised
    return (weights / weights.sum(dim=-1, keepdim=True)) @ v


def _alt_ddpm_reverse_step(x_t, eps, alpha_bar_t, alpha_bar_prev, noise):
    # through the predicted x̂0 and the posterior mean (Ho et al. 2020, eqs. 7 and 15), as diffusers does
    x0 = (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()
    alpha_t = alpha_bar_t / alpha_bar_prev
    mean = (alpha_bar_prev.sqrt() * (1 - alpha_t) * x0 + alpha_t.sqrt() * (1 - alpha_bar_prev) * x_t)
    mean = mean / (1 - alpha_bar_t)
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_t)
    return mean + variance.sqrt() * noise


def _alt_schedule_usable(betas):
    values = betas.tolist()
    if not all(0 < b <= 1 for b in values):
        return False
    if any(later < earlier for earlier, later in zip(values, values[1:])):
        return False
    alpha_bar = 1.0
    for b in values:
        alpha_bar *= 1 - b
    return 1 - values[0] > 0.9 and alpha_bar < 0.05


def _alt_cfg_batched(model_fn, x, t, cond, uncond, scale):
    out = model_fn(x.repeat(2, 1, 1, 1), t, torch.cat([cond, uncond]))  # the other order: cond first
    eps_cond, eps_uncond = out[: len(x)], out[len(x) :]
    return (1 - scale) * eps_uncond + scale * eps_cond


def _alt_inpaint_blend(x, known, noise, mask, alpha_bar):
    noised = torch.sqrt(alpha_bar) * known + torch.sqrt(1 - alpha_bar) * noise
    return torch.lerp(noised, x, mask)  # noised + mask · (x − noised)


def _alt_latent_mask(mask):
    B, C, H, W = mask.shape
    return mask.reshape(B, C, H // 4, 4, W // 4, 4).amax(dim=(3, 5))


def _alt_diffusion_loss(model, x0, noise, t, alphas_cumprod):
    a = alphas_cumprod.gather(0, t)[:, None, None, None]
    x_t = torch.sqrt(a) * x0 + torch.sqrt(1 - a) * noise
    return torch.nn.functional.mse_loss(model(x_t, t), noise)


def _alt_v_target(x0, noise, alpha_bar_t):
    # Salimans & Ho's angle form: √ᾱ = cos φ, √(1 − ᾱ) = sin φ, v = cos φ · ε − sin φ · x0
    phi = torch.atan2((1 - alpha_bar_t).sqrt(), alpha_bar_t.sqrt()).reshape(-1, 1, 1, 1)
    return phi.cos() * noise - phi.sin() * x0


def _alt_tokenize(prompt, vocabulary, max_length):
    word_ids = {word: i for i, word in enumerate(vocabulary, start=4)}
    tokens = [1] + [word_ids.get(w, 3) for w in split_words(prompt)][: max_length - 2] + [2]
    ids = torch.zeros(max_length, dtype=torch.long)
    ids[: len(tokens)] = torch.tensor(tokens)
    return ids


def _alt_contrastive_loss(image_emb, text_emb, logit_scale):
    logits = float(logit_scale) * (image_emb.double() @ text_emb.double().T)  # [B, B]
    matched = logits.diagonal()
    image_to_text = (torch.logsumexp(logits, dim=1) - matched).mean()  # −log softmax of each row's diagonal
    text_to_image = (torch.logsumexp(logits, dim=0) - matched).mean()
    return float(image_to_text + text_to_image) / 2


def _alt_resblock(x, emb, params, groups):
    def group_norm(h, name):  # by hand: statistics over each group of channels and every pixel
        B, C, H, W = h.shape
        g = h.double().reshape(B, groups, -1)
        g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-5)
        return g.reshape(B, C, H, W).float() * params[f"{name}.weight"][:, None, None] + params[f"{name}.bias"][:, None, None]

    def conv3(h, name):
        return torch.nn.functional.conv2d(h, params[f"{name}.weight"], params[f"{name}.bias"], padding=1)

    h = conv3(torch.nn.functional.silu(group_norm(x, "norm1")), "conv1")
    h = h + (emb @ params["time_proj.weight"].T + params["time_proj.bias"]).reshape(*emb.shape[:1], -1, 1, 1)
    h = conv3(group_norm(h, "norm2") * torch.sigmoid(group_norm(h, "norm2")), "conv2")  # SiLU(u) = u · σ(u)
    if "skip.weight" in params:  # a 1×1 conv is a matrix product over the channels
        x = torch.einsum("oc,bchw->bohw", params["skip.weight"][:, :, 0, 0], x) + params["skip.bias"][:, None, None]
    return x + h


def _alt_skip_channels(block_out_channels, layers_per_block):
    down = [block_out_channels[0]]  # conv_in, then each level's ResBlocks and its downsampling conv
    for i, c in enumerate(block_out_channels):
        down += [c] * (layers_per_block + (i < len(block_out_channels) - 1))
    reads = list(reversed(down))  # the up path reads them in reverse order, one per up ResBlock
    h = [block_out_channels[-1]] + [c for c in reversed(block_out_channels) for _ in range(layers_per_block + 1)]
    return [a + b for a, b in zip(h, reads)]


def _alt_loss_by_timestep(model_fn, x0, noise, timesteps, alphas_cumprod):
    K, B = len(timesteps), len(x0)
    a = alphas_cumprod[timesteps].repeat_interleave(B).reshape(-1, 1, 1, 1)  # [K·B, 1, 1, 1]
    x_t = a.sqrt() * x0.repeat(K, 1, 1, 1) + (1 - a).sqrt() * noise.repeat(K, 1, 1, 1)  # every timestep in one batch
    eps = model_fn(x_t, timesteps.repeat_interleave(B))
    return (eps - noise.repeat(K, 1, 1, 1)).pow(2).reshape(K, -1).mean(dim=1)


def _alt_edge_map(coverage):
    inside = (coverage >= 0.5).float()
    cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])[None, None]
    neighbours_in = torch.nn.functional.conv2d(inside, cross, padding=1)  # zero padding: outside the image is empty
    return inside * (neighbours_in < 3.5).float()


def _alt_inversion_step(x_s, eps, alpha_bar_s, alpha_bar_t):
    # one coefficient on x_s and one on eps (x̂0 substituted in), in float64
    a_s, a_t = alpha_bar_s.double(), alpha_bar_t.double()
    ratio = (a_t / a_s).sqrt()
    return (ratio * x_s.double() + ((1 - a_t).sqrt() - ratio * (1 - a_s).sqrt()) * eps.double()).float()


def _alt_consistency_scalings(t, sigma_data, timestep_scaling):
    u = [timestep_scaling * v for v in t.tolist()]  # python floats, float64 results
    c_skip = torch.tensor([sigma_data**2 / (x * x + sigma_data**2) for x in u], dtype=torch.float64)
    c_out = torch.tensor([x / math.hypot(x, sigma_data) for x in u], dtype=torch.float64)
    return c_skip, c_out


def _alt_iou_sweep(draw, wanted, scales):
    from sdlearn.control import object_coverage
    ious = []
    for scale in scales:
        made = (object_coverage(draw(scale)) >= 0.5).float().flatten(1)
        want = wanted.float().flatten(1)
        inter, union = (made * want).sum(1), torch.maximum(made, want).sum(1)
        ious.append(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).mean())
    return torch.stack(ious)  # a tensor, not a list



def _alt_lora_forward(x, weight, bias, lora_A, lora_B, alpha):
    # the merged weight applied once, in float64: (W₀ + (α/r) B A) h + b equals W₀ h + b + (α/r) B (A h)
    merged = weight.double() + alpha / lora_B.shape[1] * torch.einsum("or,ri->oi", lora_B.double(), lora_A.double())
    return (x.double() @ merged.T + bias.double()).float()


def _alt_lora_merge(weight, lora_A, lora_B, alpha):
    rank = lora_B.shape[1]
    update = sum(torch.outer(lora_B[:, k], lora_A[k]) for k in range(rank))  # B A as a sum of r rank-one matrices
    return weight.clone().add_(update, alpha=alpha / rank)


def _alt_lora_parameter_counts(in_features, out_features, rank):
    lora = torch.zeros(rank, in_features).numel() + torch.zeros(out_features, rank).numel()
    full = torch.zeros(out_features, in_features).numel()
    return lora, full, 1 / (1 / in_features + 1 / out_features)


def _alt_paired_change(base_correct, adapted_correct):
    pairs = list(zip(base_correct.tolist(), adapted_correct.tolist()))
    change = 100 * (sum(a for _, a in pairs) - sum(b for b, _ in pairs)) / len(pairs)
    return (torch.tensor(change), torch.tensor(sum(a and not b for b, a in pairs)),
            sum(b and not a for b, a in pairs))  # tensors where numbers are expected: accepted too

# Correct answers written the way a learner might (other operations, float64, python floats),
# which must pass: the tolerances must not reject honest floating-point differences.
ALTERNATIVE_SOLUTIONS = {
    "check_alphas_cumprod": lambda betas: torch.exp(torch.cumsum(torch.log1p(-betas.double()), 0)),
    "check_add_noise": lambda x0, n, t, ac: torch.sqrt(_bcast(ac[t], x0)) * x0 + torch.sqrt(1 - _bcast(ac[t], x0)) * n,
    "check_x0_from_noise": lambda xt, n, t, ac: xt / _bcast(ac[t], xt).sqrt() - n * (1 / _bcast(ac[t], xt) - 1).sqrt(),
    "check_cosine_betas": lambda T: (1 - (lambda f: f[1:] / f[:-1])(
        torch.cos((torch.arange(T + 1) / T + 0.008) / 1.008 * math.pi / 2) ** 2)).clamp(max=0.999),
    "check_log_snr": lambda ac: torch.log(ac / (1 - ac)),
    "check_zero_terminal_snr": lambda betas: (lambda s: 1 - torch.cat([s[:1] ** 2, (s[1:] / s[:-1]) ** 2]))(
        (lambda s: (s - s[-1]) / (s[0] - s[-1]) * s[0])(torch.cumprod(1 - betas.double(), 0).sqrt())),
    "check_ddpm_posterior_mean": _alt_posterior_mean,
    "check_ddim_step": _alt_ddim_step,
    "check_heun_step": _alt_heun_step,
    "check_reparameterize": lambda mean, logvar, noise: torch.addcmul(mean, noise, torch.exp(logvar).sqrt()),
    "check_gaussian_kl": _alt_gaussian_kl,
    "check_psnr": lambda x, y: 20 * torch.log10(2 / ((x - y) ** 2).mean(dim=(1, 2, 3)).sqrt()),
    "check_patchify": lambda x, p: torch.nn.functional.unfold(x, kernel_size=p, stride=p).transpose(1, 2),
    "check_timestep_embedding": _alt_timestep_embedding,
    "check_attention": _alt_attention,
    "check_modulate": lambda x, shift, scale: x + x * scale.unsqueeze(1) + shift.unsqueeze(1),
    "check_ddpm_reverse_step": _alt_ddpm_reverse_step,
    "check_schedule_sanity": _alt_schedule_usable,
    "check_cfg_batched": _alt_cfg_batched,
    "check_sdedit_start": lambda n, strength: n - math.floor(n * strength),
    "check_inpaint_blend": _alt_inpaint_blend,
    "check_latent_mask": _alt_latent_mask,
    "check_diffusion_loss": _alt_diffusion_loss,
    "check_ema_update": lambda ema, params, decay: {k: torch.lerp(ema[k], params[k], 1 - decay) for k in ema},
    "check_v_target": _alt_v_target,
    "check_tokenize": _alt_tokenize,
    "check_contrastive_loss": _alt_contrastive_loss,
    "check_cfg": lambda eps_uncond, eps_cond, scale: torch.lerp(eps_uncond, eps_cond, scale),
    "check_resblock": _alt_resblock,
    "check_skip_channels": _alt_skip_channels,
    "check_loss_by_timestep": _alt_loss_by_timestep,
    "check_edge_map": _alt_edge_map,
    "check_inversion_step": _alt_inversion_step,
    "check_consistency_scalings": _alt_consistency_scalings,
    "check_iou_sweep": _alt_iou_sweep,
    "check_lora_forward": _alt_lora_forward,
    "check_lora_merge": _alt_lora_merge,
    "check_lora_parameter_counts": _alt_lora_parameter_counts,
    "check_paired_change": _alt_paired_change,
}


@pytest.mark.parametrize("name", sorted(ALTERNATIVE_SOLUTIONS))
def test_checker_accepts_other_correct_ways_of_writing_it(name):
    CHECKERS[name](ALTERNATIVE_SOLUTIONS[name])  # raises ExerciseFailed if it rejects a correct answer


def test_the_experiment_checker_of_notebook_13_names_a_malformed_measurement():
    reference = CHECKERS["check_iou_sweep"].reference
    with pytest.raises(ExerciseFailed, match="expected a list of 3 numbers \\(one per scale\\), your result is a dict"):
        CHECKERS["check_iou_sweep"](lambda draw, wanted, scales: dict(zip(scales, reference(draw, wanted, scales))))
    with pytest.raises(ExerciseFailed, match="number 1 of your list is nan; expected a finite number"):
        CHECKERS["check_iou_sweep"](lambda draw, wanted, scales: [math.nan] * len(scales))
    with pytest.raises(ExerciseFailed, match="at scale number 2: expected"):
        CHECKERS["check_iou_sweep"](lambda draw, wanted, scales: [v * (1 + (k == 1)) for k, v in
                                                                  enumerate(reference(draw, wanted, scales))])



def test_the_checkers_of_notebook_12_catch_an_in_place_merge_and_a_wrong_tuple():
    def merge_in_place(weight, lora_A, lora_B, alpha):
        weight += alpha / lora_A.shape[0] * (lora_B @ lora_A)  # changes W₀: unmerging could not restore it
        return weight

    with pytest.raises(ExerciseFailed, match="changed its input number 1 in place"):
        CHECKERS["check_lora_merge"](merge_in_place)
    with pytest.raises(ExerciseFailed, match="expected a tuple of 3 values \\(lora, full, break_even_rank\\)"):
        CHECKERS["check_lora_parameter_counts"](lambda i, o, r: r * (i + o))
    with pytest.raises(ExerciseFailed, match="break_even_rank: expected"):
        CHECKERS["check_lora_parameter_counts"](lambda i, o, r: (r * (i + o), i * o, i * o // (i + o)))  # rounded down
    with pytest.raises(ExerciseFailed, match="case 1 of 5 failed.*\n.*tokens of 4 images.*\n.*raised RuntimeError"):
        CHECKERS["check_lora_forward"](lambda x, w, b, A, B, alpha: torch.mm(x, w.T) + b)  # 2-D inputs only

# -- a student copy, executed -----------------------------------------------------------------------
@pytest.mark.slow  # two Jupyter kernels
def test_a_student_copy_runs_past_its_unfinished_exercises(tmp_path):
    nbclient = pytest.importorskip("nbclient")
    src = _notebook(tmp_path / "01_run.ipynb", [
        ("code", "import torch\nfrom sdlearn.exercises import check_alphas_cumprod"),
        ("code", "def my_alphas_cumprod(betas):\n    # BEGIN SOLUTION\n    return torch.cumprod(1 - betas, dim=0)\n    # END SOLUTION"),
        ("code", "check_alphas_cumprod(my_alphas_cumprod)"),
        ("code", "print('the rest of the notebook runs')"),
    ])
    dst = make_student_copy(src, tmp_path / "student.ipynb")

    def run(path):
        nb = nbformat.read(path, as_version=4)
        nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
        return [c for c in nb.cells if c.cell_type == "code"]

    solved = run(src)
    assert "✓ Correct! check_alphas_cumprod passed 4 cases." in solved[2].outputs[0]["text"]
    assert not any(o.output_type == "error" for c in solved for o in c.outputs)

    student = run(dst)  # would raise CellExecutionError without the raises-exception tag
    errors = [(i, o.ename) for i, c in enumerate(student) for o in c.outputs if o.output_type == "error"]
    assert errors == [(2, "ExerciseNotDone")]
    assert "Replace the `raise NotImplementedError(...)` line" in student[2].outputs[0]["evalue"]
    assert student[3].outputs[0]["text"] == "the rest of the notebook runs\n"


def test_the_notation_card_travels_with_the_copies(tmp_path, course):
    (course / "notation.md").write_text("# Notation\n\nw: the guidance scale\n")
    write_student_copies(tmp_path / "class", notebooks_dir=course)
    assert (tmp_path / "class" / "notation.md").read_text() == "# Notation\n\nw: the guidance scale\n"
    assert not (tmp_path / "class" / "notes.txt").exists()  # only the files the notebooks link to
