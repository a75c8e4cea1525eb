"""Prompt formats, written once: every system builds its chat prompts here.

SmolLM2-Instruct speaks ChatML. A prompt is often assembled from pieces whose KV is cached separately (MPIC caches
passages between a head and a tail), so the template is exposed as its head and tail as well as whole.
Base models (no chat template, e.g. Gemma-3-270M base) get a plain-text format.
"""

from __future__ import annotations

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def chat_head(system: str, chat: bool = True) -> str:
    """Everything before the user's text."""
    return f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n" if chat else f"{system}\n\n"


def chat_tail(chat: bool = True) -> str:
    """Everything after the user's text, up to where the assistant's answer starts."""
    return f"{IM_END}\n{IM_START}assistant\n" if chat else "\nAnswer:"


def chat_prompt(system: str, user: str, chat: bool = True) -> str:
    """One system + user turn, ready for the assistant's answer."""
    return chat_head(system, chat) + user + chat_tail(chat)


def chat_messages(messages: list[dict], chat: bool = True) -> str:
    """An OpenAI-style message list (role/content) as one prompt ending where the assistant answers."""
    if not chat:
        body = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        return body + "\nassistant:"
    parts = [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages]
    return "".join(parts) + f"{IM_START}assistant\n"
