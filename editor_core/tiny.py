"""Small Llama-3 / Gemma-2 style models and a locally trained tokenizer.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on the texts
given, and the model is randomly initialised from a config. Tests use these to exercise
the real ``from_pretrained`` loading path on a local directory.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|unk|>"]

_FALLBACK_CORPUS = [
    "The Eiffel Tower is in Paris.", "The Colosseum is in Rome.", "Danielle Darrieux speaks French.",
    "Toko Yasuda plays the guitar.", "The mother tongue of Thomas Joannes Stieltjes is Dutch.",
    "Autonomous University of Madrid is located in Spain.", "Apple A5 was created by Apple.",
    "The headquarters of BBC is in London.", "Berlin is the capital of Germany.",
    "Python is a programming language.", "Miles Davis plays the trumpet.",
    "The official language of Brazil is Portuguese.", "Toyota is a company from Japan.",
]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, model_max_length: int = 512):
    """A byte-level BPE tokenizer (Llama-3 style: BOS added, leading-space tokens) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   pad_token="<|pad|>", unk_token="<|unk|>", model_max_length=model_max_length)


def tiny_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 4, intermediate: int = 128,
                heads: int = 4, kv_heads: int = 2, max_positions: int = 512):
    """A Llama or Gemma-2 config of the given size (tied embeddings, like small Llama-3.2/Gemma-2)."""
    from transformers import Gemma2Config, LlamaConfig

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_positions, tie_word_embeddings=True,
                  bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "llama":
        return LlamaConfig(head_dim=hidden // heads, rope_theta=10000.0, **common)
    if arch == "gemma2":
        return Gemma2Config(head_dim=hidden // heads, query_pre_attn_scalar=hidden // heads,
                            sliding_window=max_positions, attn_implementation="eager", **common)
    raise ValueError(f"arch must be 'llama' or 'gemma2', not {arch!r}")


def build_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, texts: Iterable[str] | None = None,
                     vocab_size: int = 512, **config) -> Path:
    """Write a randomly initialised tiny model plus its tokenizer to ``out_dir``; returns the path."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(texts or _FALLBACK_CORPUS, vocab_size=vocab_size)
    cfg = tiny_config(arch, vocab_size=len(tokenizer), **config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
