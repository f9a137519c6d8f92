"""GPT-2 medium with Mistral's recipe (see _gpt2.py): n_embd 1024, 24 layers, 16 heads, lr 1.5e-4."""

from jaxlm.configs import _gpt2


def get_config():
    return _gpt2.recipe("medium", lr=1.5e-4)
