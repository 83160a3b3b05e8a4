"""Offline data for demos, tests and recipes: a byte-level tokenizer and a text corpus built from what
every Python installation ships (the standard library's docstrings). Nothing is downloaded.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os

from transformers import PreTrainedTokenizer

# Modules whose docstrings make the corpus: plain English prose about programming, present in every CPython.
CORPUS_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "glob",
    "gzip", "hashlib", "heapq", "html", "http.client", "inspect", "io", "ipaddress", "itertools", "json",
    "logging", "mailbox", "math", "mimetypes", "operator", "os", "pathlib", "pickle", "pprint", "queue",
    "random", "re", "sched", "secrets", "shelve", "shutil", "socket", "sqlite3", "statistics", "string",
    "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "traceback", "typing", "unittest", "urllib.parse", "uuid", "warnings", "wave", "weakref", "zipfile",
)  # fmt: skip


def stdlib_corpus(min_chars: int = 200) -> list[str]:
    """Documents (one per docstring of at least ``min_chars`` characters) from :data:`CORPUS_MODULES`,
    in a fixed order (about 0.3 MB of text in some 430 documents on CPython 3.11)."""
    documents: list[str] = []
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        for _, obj in [("", module), *sorted(vars(module).items())]:
            doc = inspect.getdoc(obj) if (obj is module or getattr(obj, "__module__", None) == name) else None
            if doc and len(doc) >= min_chars:
                documents.append(doc)
    return list(dict.fromkeys(documents))  # drop repeats, keep order


class ByteTokenizer(PreTrainedTokenizer):
    """Byte-level tokenizer: ids 0-2 are ``<pad>``, ``<s>``, ``</s>``; id ``3 + b`` is byte ``b``.

    A real :class:`~transformers.PreTrainedTokenizer` (padding, batching, ``save_pretrained``,
    ``from_pretrained``) that needs no vocabulary file, so tests and recipes run offline.
    """

    vocab_files_names: dict[str, str] = {}
    model_input_names = ["input_ids", "attention_mask"]
    SPECIALS = ("<pad>", "<s>", "</s>")

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("pad_token", "<pad>")
        kwargs.setdefault("bos_token", "<s>")
        kwargs.setdefault("eos_token", "</s>")
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.SPECIALS) + 256

    def get_vocab(self) -> dict[str, int]:
        # The tokens exactly as `_tokenize` spells them (control bytes too), so that every entry maps back through
        # `convert_tokens_to_ids`; then the tokens added with `add_tokens`, as HF tokenizers do: `len(tokenizer)`
        # and the next added token's id are derived from this dict (without them, two `add_tokens` calls both got
        # id 259 and `len(tokenizer)` stayed 259, too small for `resize_token_embeddings`).
        vocab = {tok: i for i, tok in enumerate(self.SPECIALS)}
        vocab.update({chr(b): len(self.SPECIALS) + b for b in range(256)})
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        # One token per UTF-8 byte, spelled as a latin-1 character so it maps back losslessly.
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.SPECIALS:
            return self.SPECIALS.index(token)
        if len(token) != 1 or ord(token) > 255:
            raise ValueError(f"ByteTokenizer has no token {token!r}")
        return len(self.SPECIALS) + ord(token)

    def _convert_id_to_token(self, index: int) -> str:
        # Reached for ids that are not added tokens: past the bytes there is no token (e.g. an LM head padded wider
        # than the vocabulary), and a character past 255 would decode as text instead of failing.
        if not 0 <= index < self.vocab_size:
            raise ValueError(f"ByteTokenizer has no token with id {index} (vocabulary: 0 to {len(self) - 1})")
        if index < len(self.SPECIALS):
            return self.SPECIALS[index]
        return chr(index - len(self.SPECIALS))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # Runs of bytes decode together (a character may span several); special tokens, which reach here only
        # with skip_special_tokens=False, and tokens added with `add_tokens` (any text) keep their text.
        pieces, run = [], bytearray()
        for token in tokens:
            if len(token) != 1 or ord(token) > 255:
                pieces += [run.decode("utf-8", errors="replace"), token]
                run = bytearray()
            else:
                run.append(ord(token))
        return "".join(pieces) + run.decode("utf-8", errors="replace")

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
        ids = [self.bos_token_id, *token_ids_0]
        return ids if token_ids_1 is None else [*ids, self.eos_token_id, *token_ids_1]

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        """1 where :meth:`build_inputs_with_special_tokens` puts ``<s>`` / ``</s>``, 0 on the sequences' tokens
        (transformers' default knows only its named patterns and returned a mask one entry short of the ids)."""
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        mask = [1] + [0] * len(token_ids_0)
        return mask if token_ids_1 is None else [*mask, 1] + [0] * len(token_ids_1)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        # The vocabulary is implicit; record what it is so that the folder documents itself.
        path = os.path.join(save_directory, (filename_prefix or "") + "byte_vocab.json")
        with open(path, "w") as f:
            json.dump({"specials": list(self.SPECIALS), "byte_offset": len(self.SPECIALS)}, f)
        return (path,)
