"""Turn conversations into token ids and loss labels.

The prompt format is the tokenizer's chat template when it has one (`chat_template: auto`),
else three configurable strings (`system`, `user`, `assistant`, each with `{content}`).

Conversations are tokenised segment by segment (prompt parts and assistant replies), so
- the prompt seen at generation time is exactly a prefix of the training sequence, and
- labels mark assistant tokens by position, never by comparing ids with the pad id: a
  tokenizer whose pad is its EOS cannot hide the real EOS from the loss.
Every assistant reply ends with the EOS token, so the model learns to stop.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from data.formats import Conversation, DataError, Message

# data.template.chat_template: the tokenizer's template when it has one | never | always (an error without one)
CHAT_TEMPLATE_MODES = ("auto", "never", "always")

IGNORE_INDEX = -100  # label value the loss skips (transformers' convention)


@dataclass
class Encoded:
    """One tokenised conversation. `labels[t] == IGNORE_INDEX` where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool


class PromptFormatter:
    """Renders messages with a chat template or the configured strings, and tokenises them."""

    def __init__(self, tokenizer, chat_template: str, system: str, user: str, assistant: str):
        if chat_template not in CHAT_TEMPLATE_MODES:
            raise DataError(
                f"data.template.chat_template must be {'|'.join(CHAT_TEMPLATE_MODES)}, got {chat_template!r}"
            )
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template == "always" and not has_template:
            raise DataError("data.template.chat_template=always, but the tokenizer has no chat template")
        for key, text in (("system", system), ("user", user), ("assistant", assistant)):
            if "{content}" not in text:
                raise DataError(f"data.template.{key} must contain '{{content}}', got {text!r}")
        self.tokenizer = tokenizer
        # Pieces repeat (a pair's two replies share the prompt; template strings recur in every
        # conversation): 4096 recent pieces catch 100k of the built-in reward data's 160k (bounded,
        # so long unique texts of a large dataset cannot pile up in memory).
        self._cached_ids = functools.lru_cache(maxsize=4096)(self._tokenize)
        self.use_chat_template = has_template and chat_template != "never"
        self.strings = {"system": system, "user": user, "assistant": assistant}
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token; responses must end with one")
        self.eos_id: int = tokenizer.eos_token_id
        # BOS only where the tokenizer itself adds one (Llama does, GPT-2 and Qwen do not); a
        # chat template writes its own.
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id
        self.bos_ids = (
            [bos] if (bos is not None and probe and probe[0] == bos and not self.use_chat_template) else []
        )

    # ------------------------------------------------------------------ text

    def segments(self, messages: Sequence[Message]) -> list[tuple[str, bool]]:
        """Split the rendered conversation into (text, is_assistant_reply) pieces, in order.

        Text pieces concatenate to the full rendering. Without a chat template, each
        assistant piece is the reply alone; its EOS is added at tokenisation.
        """
        if not self.use_chat_template:
            return [(self.strings[m.role].format(content=m.content), m.role == "assistant") for m in messages]
        pieces: list[tuple[str, bool]] = []
        done = ""
        msgs = [{"role": m.role, "content": m.content} for m in messages]
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            prompt = self._render(msgs[:i], add_generation_prompt=True)
            full = self._render(msgs[: i + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise DataError(
                    "the tokenizer's chat template does not render conversations as growing prefixes, so "
                    "assistant turns cannot be located; set data.template.chat_template=never"
                )
            pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
        return [p for p in pieces if p[0]]

    def prompt_text(self, messages: Sequence[Message]) -> str:
        """The text a model is given to write the next assistant reply."""
        if self.use_chat_template:
            msgs = [{"role": m.role, "content": m.content} for m in messages]
            return self._render(msgs, add_generation_prompt=True)
        return "".join(text for text, _ in self.segments(messages))

    def _render(self, msgs: list[dict], add_generation_prompt: bool) -> str:
        if not msgs:
            return ""
        return self.tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # ------------------------------------------------------------------ ids

    def keep_end(self, ids: list[int], max_len: int) -> list[int]:
        """The last max_len of `ids` (a prompt's generation cue, a reply's scored EOS), with a leading
        BOS kept: a model trained on text that starts with one reads a cut without it as a mid-document
        continuation. Ids already within max_len are returned as they are."""
        if len(ids) <= max_len:
            return ids
        bos = self.tokenizer.bos_token_id
        if max_len > 1 and bos is not None and ids[0] == bos:
            return [bos] + ids[len(ids) - max_len + 1 :]
        return ids[len(ids) - max_len :]

    def _tokenize(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _ids(self, text: str) -> list[int]:
        return list(self._cached_ids(text))  # a fresh list: callers append the EOS

    def _reply_ids(self, text: str, final: bool) -> list[int]:
        """An assistant reply's ids as trained: with an EOS (added where the text has none), and for the
        conversation's final reply nothing after that EOS."""
        piece = self._ids(text)
        if self.eos_id not in piece:
            piece.append(self.eos_id)
        elif final:
            # a template's text after the final EOS (ChatML's newline) is no part of the reply: a
            # generation stops at the EOS, and a reward model reads its score there (PPO too)
            piece = piece[: len(piece) - piece[::-1].index(self.eos_id)]
        return piece

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of the prompt for the next assistant reply: [P].

        Built from the same pieces as `encode` (earlier replies with the EOS training gave them), so it is
        the prefix of the training sequence that a conversation ending in the next reply starts with.
        """
        ids = list(self.bos_ids)
        segments = self.segments(messages)
        for text, is_reply in segments:
            ids += self._reply_ids(text, final=False) if is_reply else self._ids(text)
        if self.use_chat_template:  # the turns after the last reply and the generation cue
            done, prompt = "".join(text for text, _ in segments), self.prompt_text(messages)
            if not prompt.startswith(done):
                raise DataError(
                    "the tokenizer's chat template does not render conversations as growing prefixes, so "
                    "assistant turns cannot be located; set data.template.chat_template=never"
                )
            ids += self._ids(prompt[len(done) :])
        return ids

    def encode(self, conversation: Conversation, max_len: int, loss_on: str = "responses") -> Encoded:
        """Ids and labels of a whole conversation, right-truncated to max_len.

        loss_on="responses": loss on assistant replies (and their EOS) only; "all": every token.
        """
        if loss_on not in ("responses", "all"):
            raise DataError(f"data.loss_on must be 'responses' or 'all', got {loss_on!r}")
        ids = list(self.bos_ids)
        labels = [IGNORE_INDEX] * len(ids)
        segments = self.segments(conversation.messages)
        for i, (text, is_reply) in enumerate(segments):
            piece = self._reply_ids(text, final=i == len(segments) - 1) if is_reply else self._ids(text)
            ids += piece
            labels += piece if (is_reply or loss_on == "all") else [IGNORE_INDEX] * len(piece)
        truncated = len(ids) > max_len
        return Encoded(ids[:max_len], labels[:max_len], truncated)
