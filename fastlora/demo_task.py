"""The task bundled with ``fastlora demo``: a Caesar cipher on short words, with its tokenizer built in memory.

A prompt is a word of 3 to 6 random lowercase letters and ``=``; the answer is the word with every
letter shifted three places down the alphabet, then ``</s>``: ``"lora="`` -> ``"orud</s>"``. The
letter to write at answer step j is prompt letter j, at a distance that depends on the word's length,
so the model must learn both the letter map and, through attention, where to read; a randomly
initialised model answers noise. Words are random, so the held-out words test the rule, not recall.

Everything is built in code: nothing is downloaded.
"""

from __future__ import annotations

import random
import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = [
    "MIN_LEN",
    "MAX_LEN",
    "build_tokenizer",
    "encrypt",
    "sample_words",
    "training_batch",
    "prompt_batch",
    "answer_length",
    "read_answer",
]

SHIFT = 3
MIN_LEN, MAX_LEN = 3, 6
SEPARATOR = "="
PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (one token per letter) that adds ``<s>`` in front of every text.

    It is a real ``PreTrainedTokenizerFast``, so it saves beside the base model and loads back with
    ``AutoTokenizer.from_pretrained``. Left padding, because prompts are batched for ``generate``.
    """
    vocab = {token: i for i, token in enumerate([PAD, BOS, EOS, SEPARATOR, *string.ascii_lowercase])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character alone
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    tokenizer.decoder = decoders.Fuse()  # letters join without spaces
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   padding_side="left")


def encrypt(word: str) -> str:
    """The answer the model must learn: each letter shifted by ``SHIFT``, wrapping from z to a."""
    return "".join(chr((ord(c) - ord("a") + SHIFT) % 26 + ord("a")) for c in word)


def sample_words(rng: random.Random, n: int, exclude: frozenset[str] = frozenset()) -> list[str]:
    """``n`` distinct random words, none of them in ``exclude`` (the held-out words, when sampling training words)."""
    words: dict[str, None] = {}  # a dict keeps the draw order, so a seed gives the same list
    while len(words) < n:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(MIN_LEN, MAX_LEN)))
        if word not in exclude:
            words[word] = None
    return list(words)


def training_batch(tokenizer: PreTrainedTokenizerFast, words: list[str]) -> dict[str, torch.Tensor]:
    """``<s> word = answer </s>`` right-padded, labelled on the answer only: the loss teaches the cipher,
    not the random prompts. Returns ``input_ids``, ``attention_mask`` and ``labels``, each ``[B, T]``.
    """
    rows = []
    for word in words:
        prompt = tokenizer(word + SEPARATOR).input_ids
        answer = tokenizer(encrypt(word), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    input_ids = [ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in rows]
    labels = [labels + [-100] * (width - len(labels)) for _, labels in rows]
    attention_mask = [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]
    return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(attention_mask),
            "labels": torch.tensor(labels)}


def prompt_batch(tokenizer: PreTrainedTokenizerFast, words: list[str]) -> dict[str, torch.Tensor]:
    """``<s> word =`` left-padded for ``generate``: ``input_ids`` and ``attention_mask``, each ``[B, T]``."""
    return dict(tokenizer([word + SEPARATOR for word in words], padding=True, return_tensors="pt"))


def answer_length(tokenizer: PreTrainedTokenizerFast, new_tokens: list[int]) -> int:
    """How many generated tokens make the answer: up to and including the first ``</s>`` (the rest is padding)."""
    eos = tokenizer.eos_token_id
    return new_tokens.index(eos) + 1 if eos in new_tokens else len(new_tokens)


def read_answer(tokenizer: PreTrainedTokenizerFast, new_tokens: list[int]) -> str:
    """The text generated before ``</s>``; when the model never wrote ``</s>``, all of it and ``...``,
    which no cipher text (letters only) equals."""
    eos = tokenizer.eos_token_id
    if eos in new_tokens:
        return tokenizer.decode(new_tokens[: new_tokens.index(eos)])
    return tokenizer.decode(new_tokens, skip_special_tokens=True) + "..."
