"""QAP, the question-answering pipeline (paper Sec. "QAP"): prompt text and token bookkeeping.

Per class name ``c`` (``classes.prompts[i][0]``) LLaVA is asked :data:`QUESTION` wrapped in
the model's chat template; its answer ``T_out^c = (S0, S1)``: S0 is the text up to and including
the first ".", S1 the rest (the description), EOS excluded. The class is present iff the answer,
stripped and lower-cased, starts with "yes" (the paper: "the first token of S0 is yes").

Choices (UNVERIFIED in the paper, see docs/fseg.md):

- Templates: ``llava_v1`` (1.5, 1.6-Vicuna: system line + ``USER: <image>\\n{prompt}
  ASSISTANT:``), ``mistral`` (``[INST] <image>\\n{prompt} [/INST]``), ``plain`` (no system line).
  The text before ``<image>`` is tokenised with special tokens (BOS), the image becomes N image
  tokens, the rest is tokenised without special tokens, as the original LLaVA
  ``tokenizer_image_token`` does. The answer is appended as its own tokenisation.
- The category token t_c^0: the tokens of S0 whose character offsets overlap the first
  case-insensitive occurrence of ``c`` in S0; a multi-token name gives several sub-tokens (their
  per-layer maps are pooled in decode, knob ``pool``). When the model's S0 does not contain the
  name (a paraphrase, a plural), S0 is replaced by the canonical ``yes, it contains a {c}.`` and
  the model's S1 is kept (counted in the evidence meta as ``s0_fallbacks``).
- ``qa: present`` (tuning sets with image-level labels, ``--preset smoke``): the yes-set is the
  ``present`` labels and the answer is teacher-forced to :func:`canonical_answer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

QUESTION = ("Does the image contain {c_name}? Answer only yes/no; if no, just say 'No.'; if yes, "
            "you must answer with two sentences: first, 'yes, it contains a {c_name}.', and "
            "second, describe this {c_name}.")
CANONICAL_S0 = "yes, it contains a {c_name}."
CANONICAL_DESCRIPTION = "The {c_name} is the main object in this image."
TEMPLATES = {
    "llava_v1": ("A chat between a curious human and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the human's questions. "
                 "USER: <image>\n{prompt} ASSISTANT:"),
    "mistral": "[INST] <image>\n{prompt} [/INST]",
    "plain": "USER: <image>\n{prompt} ASSISTANT:",
}


def question(c_name: str) -> str:
    """The paper's per-class yes/no prompt."""
    return QUESTION.format(c_name=c_name)


def canonical_answer(c_name: str) -> str:
    """The teacher-forced answer of ``qa: present``: canonical S0 + the fixed description."""
    return CANONICAL_S0.format(c_name=c_name) + " " + CANONICAL_DESCRIPTION.format(c_name=c_name)


def is_yes(answer: str) -> bool:
    """The QAP presence rule: the answer's first word is "yes" (case-insensitive)."""
    return answer.strip().lower().startswith("yes")


def template_parts(template: str) -> tuple[str, str]:
    """(text before ``<image>``, text after it with a ``{prompt}`` slot)."""
    head, tail = TEMPLATES[template].split("<image>")
    return head, tail


def prefix_ids(tokenizer: Any, template: str, image_token_id: int, n_image: int) -> list[int]:
    """Token ids of the shared prefix: template head (with BOS) + ``n_image`` image tokens."""
    head, _ = template_parts(template)
    ids = tokenizer(head, add_special_tokens=True)["input_ids"]
    return [*ids, *([image_token_id] * n_image)]


def question_ids(tokenizer: Any, template: str, c_name: str) -> list[int]:
    """Token ids after the image: ``\\n{question} ASSISTANT:`` (no special tokens)."""
    _, tail = template_parts(template)
    return tokenizer(tail.format(prompt=question(c_name)), add_special_tokens=False)["input_ids"]


@dataclass
class AnswerTokens:
    """A tokenised answer and where S0's class name and S1 lie in it (token indices)."""

    text: str
    ids: list[int]
    class_tokens: list[int]
    s1_tokens: list[int]
    fallback: bool = False


def _split(text: str) -> int:
    """Character index just past S0 (its first "."), or len(text) without one."""
    dot = text.find(".")
    return len(text) if dot < 0 else dot + 1


def locate(tokenizer: Any, text: str, c_name: str) -> AnswerTokens | None:
    """Tokenise ``text`` and find the class name in S0 and the S1 tokens; None when S0 does not
    contain ``c_name`` (case-insensitive)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    s0_end = _split(text)
    at = text[:s0_end].lower().find(c_name.lower())
    if at < 0:
        return None
    a, b = at, at + len(c_name)
    cls = [i for i, (s, e) in enumerate(offsets) if s < b and e > a and e > s]
    s1 = [i for i, (s, e) in enumerate(offsets) if s >= s0_end and e > s
          and text[s:e].strip()]
    if not cls:
        return None
    return AnswerTokens(text, ids, cls, s1)


def answer_tokens(tokenizer: Any, text: str, c_name: str) -> AnswerTokens:
    """:func:`locate`, falling back to the canonical S0 followed by the model's S1."""
    found = locate(tokenizer, text, c_name)
    if found is not None:
        return found
    s1 = text[_split(text):].strip()
    canon = CANONICAL_S0.format(c_name=c_name) + (" " + s1 if s1 else "")
    found = locate(tokenizer, canon, c_name)
    assert found is not None
    found.fallback = True
    return found
