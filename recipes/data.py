"""Offline corpora for the recipes, tokenised with kimi_hf's byte-level tokenizer (nothing is downloaded).

Two corpora:
  stdlib   the Python standard library's docstrings (:func:`kimi_hf.data.stdlib_corpus`): English prose.
  grammar  a synthetic language from a small probabilistic grammar with long-range structure (subject-verb
           agreement across nested relative clauses, balanced brackets, copied names), generated from a seed.
Documents are split into train/validation BEFORE being cut into blocks, so validation text is held out.
"""

from __future__ import annotations

import random

import torch

from kimi_hf.data import ByteTokenizer, stdlib_corpus

CORPORA = ("stdlib", "grammar")

_NOUNS = {"sg": ["cat", "robot", "teacher", "river", "engine", "poet", "garden", "pilot"],
          "pl": ["cats", "robots", "teachers", "rivers", "engines", "poets", "gardens", "pilots"]}  # fmt: skip
_VERBS = {"sg": ["sees", "likes", "builds", "follows", "paints", "counts"],
          "pl": ["see", "like", "build", "follow", "paint", "count"]}  # fmt: skip
_ADJECTIVES = ["old", "quiet", "red", "clever", "small", "distant", "bright"]
_NAMES = ["Ada", "Boris", "Chen", "Dara", "Emil", "Farah", "Goro", "Hana"]


def _noun_phrase(rng: random.Random, number: str, depth: int) -> str:
    words = ["the"] + [rng.choice(_ADJECTIVES) for _ in range(rng.choice((0, 0, 1, 2)))]
    words.append(rng.choice(_NOUNS[number]))
    if depth < 3 and rng.random() < 0.35:  # relative clause: its verb agrees with its own subject
        inner = rng.choice(("sg", "pl"))
        words += ["that", _noun_phrase(rng, inner, depth + 1), rng.choice(_VERBS[inner])]
    return " ".join(words)


def _sentence(rng: random.Random) -> str:
    number = rng.choice(("sg", "pl"))
    subject = _noun_phrase(rng, number, 0)
    sentence = f"{subject} {rng.choice(_VERBS[number])} {_noun_phrase(rng, rng.choice(('sg', 'pl')), 1)}"
    if rng.random() < 0.3:  # bracketed aside, closed in order
        depth = rng.randint(1, 3)
        sentence += " " + "(" * depth + rng.choice(_ADJECTIVES) + ")" * depth
    return sentence[0].upper() + sentence[1:] + "."


def grammar_corpus(num_docs: int = 4000, seed: int = 0) -> list[str]:
    """``num_docs`` documents: a named speaker, some sentences, and the speaker's name repeated at the end."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        name = rng.choice(_NAMES)
        body = " ".join(_sentence(rng) for _ in range(rng.randint(2, 6)))
        docs.append(f"{name} said: {body} So said {name}.")
    return docs


def documents(corpus: str, seed: int = 0, num_docs: int = 4000) -> list[str]:
    """The documents of ``corpus`` (``num_docs`` only applies to the generated grammar corpus)."""
    if corpus == "stdlib":
        return stdlib_corpus()
    if corpus == "grammar":
        return grammar_corpus(num_docs=num_docs, seed=seed)
    raise ValueError(f"unknown corpus {corpus!r}: expected one of {CORPORA}")


def _encode(tokenizer: ByteTokenizer, doc: str) -> torch.Tensor:
    """<s> + the UTF-8 bytes shifted past the specials + </s>, vectorised (the slow tokenizer takes ~30 s
    on the corpus); the layout is ByteTokenizer's documented one, and checked against it in ``token_splits``."""
    body = torch.frombuffer(bytearray(doc.encode("utf-8")), dtype=torch.uint8).long() + len(tokenizer.SPECIALS)
    bos, eos = torch.tensor([tokenizer.bos_token_id]), torch.tensor([tokenizer.eos_token_id])
    return torch.cat([bos, body, eos])


def _blocks(tokenizer: ByteTokenizer, docs: list[str], seq_len: int) -> torch.Tensor:
    ids = torch.cat([_encode(tokenizer, doc) for doc in docs])
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"corpus split too small for one block of {seq_len} tokens ({len(ids)} tokens)")
    return ids[: n * seq_len].view(n, seq_len)


def token_splits(
    corpus: str, seq_len: int, val_fraction: float = 0.05, seed: int = 0, num_docs: int = 4000
) -> tuple[torch.Tensor, torch.Tensor, ByteTokenizer]:
    """Train and validation blocks [N, seq_len] / [M, seq_len] (documents shuffled with ``seed`` then split).

    The grammar corpus has about 280 tokens per document (``num_docs=4000``: 1.1M tokens)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    docs = documents(corpus, seed, num_docs)
    random.Random(seed).shuffle(docs)
    n_val = max(1, int(len(docs) * val_fraction))
    tokenizer = ByteTokenizer()
    reference = tokenizer(docs[0])["input_ids"] + [tokenizer.eos_token_id]
    if _encode(tokenizer, docs[0]).tolist() != reference:
        raise ValueError("fast byte encoding disagrees with ByteTokenizer: its id layout changed")
    return _blocks(tokenizer, docs[n_val:], seq_len), _blocks(tokenizer, docs[:n_val], seq_len), tokenizer
