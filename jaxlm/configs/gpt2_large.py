"""GPT-2 large with Mistral's recipe (see _gpt2.py): n_embd 1280, 36 layers, 20 heads, lr 2.5e-4 (GPT-3 paper, 760M)."""

from jaxlm.configs import _gpt2


def get_config():
    return _gpt2.recipe("large", lr=2.5e-4)
