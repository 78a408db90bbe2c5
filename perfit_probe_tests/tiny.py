"""Tiny random-init models and a tiny tokenizer for fast offline tests."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

CORPUS = [
    "The user rated the movie Star Wars (1977) five stars.",
    "Genres: Action, Adventure, Sci-Fi, Drama, Comedy, Romance, Thriller, Horror.",
    "Predict the rating from 1 to 5 that this user gives to the movie.",
    "History of the user: Toy Story (1995) rated 4; Fargo (1996) rated 5.",
    "Answer with a single number. The answer is 1 2 3 4 5.",
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu",
    "user query profile item title text score tag description category",
] * 20


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ~400) trained in a second on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    return fast


def tiny_config(arch: str = "llama"):
    """Config of a 4-layer, d_model 32 model of the given architecture."""
    from transformers import GPT2Config, LlamaConfig

    vocab = len(tiny_tokenizer())
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager",
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=4, n_head=4, n_positions=512,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager",
        )
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0):
    """A ``LoadedModel`` holding a random-init tiny model and the tiny tokenizer."""
    from transformers import AutoModelForCausalLM

    from perfit_probe.models import prepare_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="eager")
    return prepare_model(model, tiny_tokenizer(), f"tiny-{arch}")


def save_tiny_model(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write a tiny model and tokenizer as a Hugging Face directory; return the path."""
    loaded = tiny_model(arch, seed)
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path
