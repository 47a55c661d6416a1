"""The prompt of docs/method.md §4: the question followed by the think/boxed instruction, as a user turn.

Every command that talks to a model (warm start, detector, trainer, evaluation) builds its
messages here, so the prompt the model was warm-started on is the prompt it is trained and
probed on.
"""

from __future__ import annotations

INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final "
    "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST "
    "BE put in \\boxed{}."
)


def instruction_for(enabled: bool) -> str | None:
    """The instruction to append (`--instruction`, on by default), or None to leave questions as given."""
    return INSTRUCTION if enabled else None


def build_messages(question: str, num_images: int = 1, instruction: str | None = INSTRUCTION) -> list[dict]:
    """Chat messages for one prompt: `num_images` image placeholders, then the question and instruction.

    The images come first, as in Qwen2.5-VL's own examples; `instruction=None` leaves it out (for
    tasks whose questions already carry their own).
    """
    if not question or not question.strip():
        raise ValueError("question is empty: every sample needs a non-empty question")
    text = question.strip() if instruction is None else f"{question.strip()} {instruction}"
    content: list[dict] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]
