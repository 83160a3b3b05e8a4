"""Multi-digit addition as text, generated locally, for the CE-LoRA quality recipe.

An example is ``"0123+0456=" -> "97500"``: fixed-width (zero-padded) operands and the sum written
least-significant digit first, so that each answer digit depends only on digits already seen (the carry
can be computed left to right). Every prompt of a task has the same length, so a batch decodes greedily
without padding. ``carry=False`` gives the carry-less variant (digit-wise sum mod 10) that the base model
is pre-trained on; fine-tuning must then learn the carries.

Tokens: ``<pad>``, ``<eos>``, digits, ``+`` and ``=`` (one token per character).
"""

from __future__ import annotations

import torch

VOCAB = ["<pad>", "<eos>", *"0123456789", "+", "="]
PAD, EOS = 0, 1
_ID = {ch: i for i, ch in enumerate(VOCAB)}


def encode(text: str) -> list[int]:
    return [_ID[ch] for ch in text]


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids if i > EOS)


def answer(a: int, b: int, digits: int, carry: bool) -> str:
    """The reversed sum (``digits + 1`` characters): true sum with carries, or digit-wise mod 10 without."""
    if carry:
        total = f"{a + b:0{digits + 1}d}"
    else:
        da, db = f"{a:0{digits}d}", f"{b:0{digits}d}"
        total = "0" + "".join(str((int(x) + int(y)) % 10) for x, y in zip(da, db))
    return total[::-1]


def make_examples(count: int, digits: int, carry: bool, seed: int) -> dict[str, list]:
    """``count`` problems: ``input_ids`` (prompt + answer + eos), ``labels`` (-100 on the prompt), and the
    ``prompt`` / ``target`` strings for exact-match evaluation."""
    gen = torch.Generator().manual_seed(seed)
    ops = torch.randint(0, 10**digits, (count, 2), generator=gen).tolist()
    out: dict[str, list] = {"input_ids": [], "labels": [], "prompt": [], "target": []}
    for a, b in ops:
        prompt = f"{a:0{digits}d}+{b:0{digits}d}="
        target = answer(a, b, digits, carry)
        ids = encode(prompt + target) + [EOS]
        n_prompt = len(prompt)
        out["input_ids"].append(ids)
        out["labels"].append([-100] * n_prompt + ids[n_prompt:])
        out["prompt"].append(prompt)
        out["target"].append(target)
    return out


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    """Stack equal-length examples (every example of a task has the same length)."""
    return {
        "input_ids": torch.tensor([f["input_ids"] for f in features]),
        "labels": torch.tensor([f["labels"] for f in features]),
    }


@torch.no_grad()
def exact_match(model: torch.nn.Module, prompts: list[str], targets: list[str], batch_size: int = 256) -> float:
    """Fraction of prompts whose greedy continuation equals the target exactly."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(prompts), batch_size):
        ids = torch.tensor([encode(p) for p in prompts[start : start + batch_size]], device=device)
        width = len(targets[start])
        for _ in range(width):  # greedy, no cache needed at these lengths
            logits = model(input_ids=ids).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        for row, target in zip(ids[:, -width:].tolist(), targets[start : start + batch_size]):
            correct += decode(row) == target
    return correct / len(prompts)
