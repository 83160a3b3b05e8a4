"""Digit-table tasks as text, generated locally, for the CE-LoRA quality recipe.

An example is a line of ``pairs`` single-digit problems written back to back, ``"3+4=72+5=7..."``, then
``<eos>``. The task sets the table: ``"digit_sum"`` answers ``(a + b) mod 10``, ``"digit_product"``
``(a * b) mod 10``. Only the answers are labelled: the ``<eos>`` closing every line, at a fixed position,
would only add a token every method predicts, diluting the loss gaps between them.

Each answer reads the two digits just before it, an attention pattern a small model learns in a few
hundred steps. A base model pre-trained on one table can then be fine-tuned to the other: attention
stays, the 100-entry table its MLPs compute changes.

Exact match: an example counts when every answer digit is the model's top-1 prediction given the true
prefix. Since each answer depends only on its own prefix, this is the same as
greedy decoding of every answer, in one forward pass. A constant guess gets ``0.1**pairs`` on the sum
table and ``0.27**pairs`` on the product table (whose answer is 0 for 27 of its 100 entries).

Tokens: ``<pad>``, ``<eos>``, digits, ``+`` and ``=`` (one token per character).
"""

from __future__ import annotations

import torch

VOCAB = ["<pad>", "<eos>", *"0123456789", "+", "="]
PAD, EOS = 0, 1
DIGIT0, PLUS, EQUALS = 2, 12, 13  # ids of "0", "+", "="
TASKS = ("digit_sum", "digit_product")
PROBLEM = 5  # tokens per problem: a + b = c


def make_examples(count: int, pairs: int, task: str, seed: int) -> dict[str, torch.Tensor]:
    """``count`` lines of ``pairs`` problems: ``input_ids`` and ``labels`` (-100 off the answers), both
    ``[count, PROBLEM * pairs + 1]`` int64."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {TASKS}")
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, 10, (2, count, pairs), generator=gen)
    c = (a + b) % 10 if task == "digit_sum" else (a * b) % 10
    ops = torch.full_like(a, PLUS), torch.full_like(a, EQUALS)
    ids = torch.stack([a + DIGIT0, ops[0], b + DIGIT0, ops[1], c + DIGIT0], dim=-1).reshape(count, -1)
    ids = torch.cat([ids, torch.full((count, 1), EOS)], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, PROBLEM - 1 :: PROBLEM] = ids[:, PROBLEM - 1 :: PROBLEM]  # the answers (not the final <eos>)
    return {"input_ids": ids, "labels": labels}


def collate(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack equal-length examples (every example of a task has the same length)."""
    return {key: torch.stack([f[key] for f in features]) for key in ("input_ids", "labels")}


@torch.no_grad()
def exact_match(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of examples whose every labelled token is the model's top-1 prediction (teacher forcing)."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(input_ids), batch_size):
        ids = input_ids[start : start + batch_size].to(device)
        target = labels[start : start + batch_size, 1:].to(device)
        predicted = model(input_ids=ids).logits[:, :-1].argmax(-1)
        correct += ((predicted == target) | (target == -100)).all(dim=1).sum().item()
    return correct / len(input_ids)
