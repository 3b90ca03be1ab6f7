"""Random strings against the three places that read what a user types: the caption parser, the tokenizer and
the command line's arguments (issue 20).

The properties: ``parse_caption`` and the tokenizer raise nothing but ``ValueError``; every command-line error
exits with status 2 and one line on stderr (no traceback). The command line runs in this process, in a temporary
folder, with the work itself replaced by stand-ins: training and writing notebooks stop the run at once, and the
pipeline draws one batch of random images, which are written under the fuzzed names before the run stops.
Examples are few and small, so this runs in seconds.
"""

import contextlib
import io
import warnings

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import sdlearn.__main__ as cli
from sdlearn.data import VOCABULARY, parse_caption
from sdlearn.samplers import SAMPLER_NAMES
from sdlearn.text import Tokenizer

# Text as a user may type it: any characters (no surrogates, which no terminal sends), or words of the
# captions' vocabulary mixed with near-misses, punctuation and accents, which reach deeper into the parser.
ANY_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
NEAR_WORDS = ["réd", "circles", "AND", "and and", "top-left", "3", ",", ".", "!", "", " ", "\n", "\t", "ß", "ǅ", "İ"]
CAPTION_LIKE = st.lists(st.sampled_from(VOCABULARY + NEAR_WORDS), max_size=14).map(" ".join)
TEXT = st.one_of(ANY_TEXT, CAPTION_LIKE)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(TEXT)
def test_parse_caption_raises_only_value_error(text):
    try:
        parsed = parse_caption(text)
    except ValueError as error:
        assert str(error)
    else:
        assert isinstance(parsed, dict)


TOKENIZER = Tokenizer()


@FUZZ
@given(st.one_of(TEXT, st.lists(TEXT, max_size=4)))
def test_the_tokenizer_raises_only_value_error(prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown words and long prompts warn; that is their job
        try:
            ids, mask = TOKENIZER(prompts)
        except ValueError:
            return
    batch = 1 if isinstance(prompts, str) else len(prompts)
    assert ids.shape == mask.shape == (batch, TOKENIZER.max_length)
    if batch:
        assert ids.min() >= 0 and ids.max() < TOKENIZER.vocab_size
        assert mask[:, 0].all()  # every prompt starts with <bos>


@FUZZ
@given(st.lists(st.integers(-2**63, 2**63 - 1), max_size=30))
def test_decoding_any_ids_raises_only_value_error(ids):
    try:
        assert isinstance(TOKENIZER.decode(torch.tensor(ids, dtype=torch.long)), str)
    except ValueError:
        pass


# ------------------------------------------------------------------------------------------------
# The command line

class Reached(Exception):
    """The arguments were accepted and the work would now begin."""


def stand_in(*args, **kwargs):
    raise Reached


class OneBatchPipeline:
    """Stands in for the pipeline: random images for the first batch (so the files are written, under the fuzzed
    names), then it stops the run."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompt, num_images_per_prompt=1, **kwargs):
        self.calls += 1
        if self.calls > 1:
            raise Reached
        return torch.rand(num_images_per_prompt, 3, 32, 32) * 2 - 1


OPTIONS = {
    "generate": ["--negative", "--steps", "--guidance", "--sampler", "--seed", "--n", "--out", "--out-dir", "--weights",
                 "--device"],
    "train": ["--minutes", "--steps", "--device", "--out", "--seed", "--data", "--threads", "--prediction-type"],
    "exercises": ["--force"],
}
# Path-like tokens hold no slash, so that nothing can reach outside the temporary folder the test runs in.
SAFE_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\\~"), max_size=12)
NUMBERS = st.one_of(st.integers(-2**70, 2**70).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["1e308", "1e999", "-0", "0x10", "1_000", " 7 ", "٣", "nan", "inf"]))
VALUES = st.one_of(SAFE_TEXT, NUMBERS, st.sampled_from([*SAMPLER_NAMES, "cpu", "cuda", "auto", "x.png", "grid.jpg",
                                                        "out", "vae", "all", "epsilon", "shapes", "-", "--"]))
TOKENS = st.one_of(VALUES, st.sampled_from(sorted({o for opts in OPTIONS.values() for o in opts} | set(OPTIONS))))


# Values an option accepts, more often than random ones would be, so that runs also get past the parser.
PLAUSIBLE = {
    "--steps": st.integers(1, 3).map(str), "--n": st.integers(1, 3).map(str), "--threads": st.integers(1, 4).map(str),
    "--guidance": st.sampled_from(["0", "1", "4", "7.5"]), "--minutes": st.sampled_from(["0.01", "1"]),
    "--seed": st.integers(0, 2**64 - 1).map(str), "--sampler": st.sampled_from(SAMPLER_NAMES),
    "--device": st.just("cpu"), "--negative": SAFE_TEXT, "--prediction-type": st.sampled_from(["epsilon", "sample"]),
}


@st.composite
def command_lines(draw):
    if draw(st.integers(0, 2)) == 0:  # anything at all
        return draw(st.lists(TOKENS, max_size=8))
    command = draw(st.sampled_from(sorted(OPTIONS)))
    argv = [command]
    if command == "train":
        argv.append(draw(st.one_of(st.sampled_from(sorted(cli.TRAINERS)), SAFE_TEXT)))
    else:
        argv.append(draw(SAFE_TEXT))
    if command == "generate" and draw(st.integers(0, 3)):  # mostly somewhere to write, under a fuzzed name
        name = draw(SAFE_TEXT)
        argv += draw(st.sampled_from([["--out-dir", name], ["--out", name + ".png"]]))
    for option in draw(st.lists(st.sampled_from(OPTIONS[command]), max_size=5)):
        argv.append(option)
        if option != "--force":
            argv.append(draw(st.one_of(PLAUSIBLE.get(option, VALUES), VALUES)))
    return argv


@pytest.fixture
def work_stood_in(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "load_pipeline", lambda *args, **kwargs: OneBatchPipeline())
    monkeypatch.setattr(cli, "write_student_copies", stand_in)
    for name in cli.TRAINERS:
        monkeypatch.setitem(cli.TRAINERS, name, stand_in)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the cap is tested in test_hostile_cli.py


@FUZZ
@given(argv=command_lines())
def test_every_command_line_error_is_one_line_with_status_2(work_stood_in, argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = cli.main(argv)
        except Reached:
            event("accepted: the work began")
            return
        except SystemExit as stop:
            code = stop.code
    if code == 0:  # images written, or --help (or an abbreviation of it)
        event("exit 0")
        assert "error:" not in err.getvalue()
        return
    event(f"exit {code}")
    assert code == 2, (argv, err.getvalue())
    lines = err.getvalue().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("python -m sdlearn"), (argv, err.getvalue())
    assert all(line.startswith("warning: ") for line in lines if line not in errors), (argv, err.getvalue())

