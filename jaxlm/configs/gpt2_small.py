"""GPT-2 small with Mistral's recipe (see _gpt2.py): n_embd 768, 12 layers, 12 heads, lr 6e-4."""

from jaxlm.configs import _gpt2


def get_config():
    return _gpt2.recipe("small", lr=6e-4)
