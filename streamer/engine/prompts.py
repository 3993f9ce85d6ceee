"""Text prefixes (questions, caption prompts) and what a model's answer is.

GIT answers a question given as the text prefix after [CLS]; the generated text
after the prefix is the answer. A model may first say what it sees and then the
answer after a marker word (the bundled model: "a big red circle moves up so
red"), named by `answer_marker` in its config.json: the caption is the evidence
the answer is read from, and the answer is the text after the marker's last
occurrence. Hub VQA checkpoints have no marker: the whole text is the answer.
"""

from __future__ import annotations

__all__ = ["MAX_QUESTION_CHARS", "answer_marker", "split_answer"]

# Longest question accepted (characters; the model's text positions may allow fewer tokens).
MAX_QUESTION_CHARS = 512


def answer_marker(model_config) -> str | None:
    """The word after which a model's answer starts, or None (the whole text is the answer)."""
    marker = getattr(model_config, "answer_marker", None)
    return marker if isinstance(marker, str) and marker.strip() else None


def split_answer(text: str, marker: str | None) -> tuple[str, str]:
    """(evidence, answer) of a generated text: with a marker, the words before its
    last occurrence and those after it ("" when the model never said the marker:
    it ran out of tokens before answering); without one, ("", the whole text)."""
    words = text.split()
    if marker is None:
        return "", " ".join(words)
    if marker not in words:
        return " ".join(words), ""
    at = len(words) - 1 - words[::-1].index(marker)
    return " ".join(words[:at]), " ".join(words[at + 1 :])
