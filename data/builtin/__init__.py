"""The built-in review task: prompts, mixed-quality demonstrations, noisy preferences, gold judge."""

from data.builtin import task
from data.formats import Conversation, Message


def sft_conversations(
    num: int, seed: int, eval_fraction: float
) -> tuple[list[Conversation], list[Conversation]]:
    """Demonstrations on the training prompts, and an eval set on held-out prompts."""
    train_prompts, heldout = task.split_prompts(seed)
    n_eval = max(1, int(num * eval_fraction))

    def convs(pairs: list[tuple[str, str]], tag: str) -> list[Conversation]:
        return [
            Conversation((Message("user", p), Message("assistant", r)), f"builtin:{tag}:{i}")
            for i, (p, r) in enumerate(pairs)
        ]

    return convs(task.sft_examples(num, seed, train_prompts), "train"), convs(
        task.sft_examples(n_eval, seed + 1, heldout), "eval"
    )
