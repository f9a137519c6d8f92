"""GPT-2 xl with Mistral's recipe (see _gpt2.py): n_embd 1600, 48 layers, 25 heads, lr 2.0e-4 (GPT-3 paper, 1.3B)."""

from jaxlm.configs import _gpt2


def get_config():
    return _gpt2.recipe("xl", lr=2.0e-4)
