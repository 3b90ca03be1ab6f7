"""benchmarks/guidance_sweep.py's ``ConditionAnnealing`` (CADS, Sadat et al. 2024): it noises only the conditional
rows' text tokens, only above τ1·T, keeps their mean and standard deviation, and replaces them fully above τ2·T."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "guidance_sweep.py"


def load_script():
    spec = importlib.util.spec_from_file_location("guidance_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Spy(torch.nn.Module):
    """Records the text tokens it is called with."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"num_train_timesteps": 1000})()
        self.seen = None

    def forward(self, x, t, text_tokens=None, text_mask=None):
        self.seen = text_tokens
        return x


def tokens_and_mask():
    tokens = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))  # [B, L, D]
    mask = torch.tensor([[True] * 5 + [False], [True, True] + [False] * 4])  # row 0 a prompt, row 1 the empty one
    return tokens, mask


def test_condition_annealing_leaves_low_noise_and_the_unconditional_row_alone():
    spy = Spy()
    cads = load_script().ConditionAnnealing(spy, empty_length=2, tau1=0.6, tau2=0.9, noise_scale=0.25)
    tokens, mask = tokens_and_mask()
    x = torch.zeros(2, 4, 8, 8)
    cads(x, torch.tensor(500), tokens, mask)  # t = 0.5 T ≤ τ1 T: γ = 1, nothing changes
    assert torch.allclose(spy.seen, tokens, atol=1e-6)
    cads(x, torch.tensor(800), tokens, mask)  # between τ1 and τ2: the prompt's row is noised, the empty row is not
    assert torch.equal(spy.seen[1], tokens[1])
    assert not torch.allclose(spy.seen[0], tokens[0], atol=1e-3)
    assert torch.allclose(spy.seen[0].mean(), tokens[0].mean(), atol=1e-5)
    assert torch.allclose(spy.seen[0].std(), tokens[0].std(), atol=1e-5)
    assert cads(x, torch.tensor(800)) is x  # no text at all: passed through


def test_condition_annealing_replaces_the_prompt_above_tau2():
    spy = Spy()
    cads = load_script().ConditionAnnealing(spy, empty_length=2, tau1=0.6, tau2=0.9, noise_scale=0.25)
    tokens, mask = tokens_and_mask()
    cads(torch.zeros(2, 4, 8, 8), torch.tensor(950), tokens, mask)  # γ = 0: pure noise, rescaled to y's statistics
    correlation = torch.corrcoef(torch.stack([spy.seen[0].flatten(), tokens[0].flatten()]))[0, 1]
    assert abs(correlation) < 0.3
