"""The one prompt per image and which of its tokens belong to which class.

Step 2 of PnP-OVSS prompts the ITM model with one text listing the classes present,
``"a picture of {c1} {c2} ... {cK}"`` (the reference code: ``"A picture of " + " ".join(names)``).
Each class name is tokenised on its own (with the separating space, so BPE tokenizers see it as in
the joined text); the joined prompt, tokenised with the model's special tokens, must contain those
pieces in order, which gives the token rows of class k without string offsets, for word-piece
(BLIP/BERT) and byte-level BPE (BridgeTower/RoBERTa) tokenizers alike. With ``squash_names``
spaces and hyphens are removed from names, as the reference code does ("pottedplant").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from methods.base import ClassSet, OvssError, class_key


@dataclass(frozen=True)
class Prompt:
    """input_ids: ``[1, T]`` int64; groups[k]: the token rows of class k (increasing);
    text: the prompt as a string (for logs)."""

    input_ids: torch.Tensor
    groups: tuple[tuple[int, ...], ...]
    text: str

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.ones_like(self.input_ids)

    @property
    def class_rows(self) -> list[int]:
        """Every token row that belongs to some class (the rows the drop salience sums)."""
        return [r for g in self.groups for r in g]


def class_text(name: str, squash: bool) -> str:
    return name.replace(" ", "").replace("-", "").replace("_", "") if squash else name.strip()


def prompt_name(settings: Mapping[str, Any], classes: ClassSet, label: int) -> str:
    """The text of class ``label`` in the prompt: ``prompt_names[names[label]]`` (the
    reference's names, a data set setting) or its first prompt, squashed (``squash_names``)."""
    name = settings["prompt_names"].get(classes.names[label], classes.prompts[label][0])
    return class_text(name, bool(settings["squash_names"]))


def check_prompt_names(settings: Mapping[str, Any], classes: ClassSet,
                       labels: Sequence[int]) -> list[str]:
    """The prompt names of ``labels``; OvssError when two of them are one word (class_key):
    the two classes' token maps would then come from the same word, so which of them a pixel
    gets would say nothing about the image."""
    names, seen = [], {}
    for c in labels:
        text = prompt_name(settings, classes, c)
        first = seen.setdefault(class_key(text), c)
        if first != c:
            raise OvssError(f"pnp: classes {classes.names[first]!r} and {classes.names[c]!r} are "
                            f"both {text!r} in the prompt (settings.prompt_names or the class "
                            "names); give them different prompt names")
        names.append(text)
    return names


def build_prompt(tokenizer: Any, names: Sequence[str], prefix: str = "a picture of",
                 enc_token_id: int | None = None) -> Prompt:
    """Tokenise ``prefix + " " + " ".join(names)``; ``enc_token_id`` replaces the first
    (``[CLS]``) token, as BLIP's ITM does with ``[ENC]``."""
    ids = list(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    spans = []
    for name in names:
        piece = tokenizer(" " + name, add_special_tokens=False)["input_ids"]
        spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
    text = " ".join([prefix, *names])
    full = list(tokenizer(text)["input_ids"])        # the tokenizer's own special tokens
    lead = _leading_specials(full, ids)
    if enc_token_id is not None:
        full[0] = enc_token_id
    groups = tuple(tuple(range(lead + a, lead + b)) for a, b in spans)
    return Prompt(torch.tensor([full], dtype=torch.long), groups, text)


def _leading_specials(full: list[int], ids: list[int]) -> int:
    """Where the per-name tokenisation ``ids`` sits in the joined prompt's ``full`` ids."""
    for off in range(len(full) - len(ids) + 1):
        if full[off:off + len(ids)] == ids:
            return off
    raise OvssError("pnp: the tokenizer splits the joined prompt differently from its class "
                    "names; cannot tell which tokens belong to which class")
