"""One renderer: conversations and plain text to token ids, for serving, scoring, every
trainer and the rollouts (ARCHITECTURE.md, Chat models).

A prompt is text or a conversation (a list of {"role", "content"} messages); a reply is
text or, in training data, a list of messages. Conversations are rendered with the
tokenizer's own chat template, the way `apply_chat_template` does, so the ids a trainer
learns on are the ids the server feeds the model:

    prompt_ids(tok, prompt)               what generation starts from (a generation prompt
                                          after a conversation, as vLLM's chat API does)
    reply_ids(tok, prompt, reply)         the tokens of the reply that a policy produces after
                                          prompt_ids: text + EOS, or the assistant turn through
                                          its end-of-turn token
    reward_ids(tok, prompt, reply)        what a reward model reads: prompt + reply as one text,
                                          or the conversation with the reply as its last
                                          assistant turn (TRL's RewardTrainer)
    render_conversation(tok, messages)    ids and the mask of assistant tokens (SFT's labels)
    end_token_ids(tok, generation_config) the ids that end a completion, everywhere

Shared by the server and the trainers, hence in the root package rather than in either.
"""

from __future__ import annotations

from typing import Iterable, Union

from rlhfkit.errors import InvalidArgumentError

ROLES = ("system", "user", "assistant")

Messages = list[dict]
Prompt = Union[str, Messages]


class ChatFormatError(InvalidArgumentError):
    """A conversation is malformed (or the template refuses it); `field` names where."""


class NoChatTemplateError(ValueError):
    """A conversation was given to a model whose tokenizer has no chat template."""


def as_messages(messages: Iterable, field: str = "messages") -> Messages:
    """Validate a conversation: dicts or objects with `role` and `content` (ChatMessage
    protos), at least one, each role one of ROLES, each content a string. Returns plain dicts."""
    out = []
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (m.role, m.content)
        if role not in ROLES:
            raise ChatFormatError(f"{field}[{i}].role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ChatFormatError(f"{field}[{i}].content", f"must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if not out:
        raise ChatFormatError(field, "is empty: give at least one message")
    return out


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer, model_name: str):
    if not has_chat_template(tokenizer):
        raise NoChatTemplateError(
            f"model {model_name!r} has no chat template (its tokenizer has no chat_template), so it cannot "
            "render messages: send prompt text or prompt_token_ids, or serve a chat model")


def _apply(tokenizer, messages: Messages, add_generation_prompt: bool) -> list[int]:
    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    except Exception as e:  # jinja's TemplateError (e.g. "roles must alternate"), a missing template
        if not has_chat_template(tokenizer):
            raise NoChatTemplateError("the tokenizer has no chat template, so it cannot render a conversation: use a "
                                      "chat model's tokenizer (one with a chat_template), or give prompts as text "
                                      "(`rlhfkit train data --format text`)") from None
        raise ChatFormatError("messages", f"the chat template refused the conversation: {e}") from None
    ids = out["input_ids"] if hasattr(out, "keys") else out  # a BatchEncoding in transformers 5, a list before
    return list(ids)


def special_token_ids(tokenizer) -> set[int]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}


_SENTINEL = "rlhfkit-end-of-turn-probe"


def end_of_turn_token_id(tokenizer) -> int | None:
    """The special token the chat template puts right after an assistant's content
    (<|im_end|>, <|eot_id|>, <end_of_turn>, <|end|>, </s>), or None."""
    if not has_chat_template(tokenizer):
        return None
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False)
    except Exception:
        return None
    at = text.rfind(_SENTINEL)
    if at < 0:
        return None
    suffix = tokenizer(text[at + len(_SENTINEL):], add_special_tokens=False)["input_ids"]
    return suffix[0] if suffix and suffix[0] in special_token_ids(tokenizer) else None


def end_token_ids(tokenizer, generation_config=None) -> set[int]:
    """What ends a completion: generation_config's EOS id(s), the tokenizer's EOS and the
    chat template's end-of-turn token. The engine, the vLLM engine and the rollouts all use it."""
    ids: set[int] = set()
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    ids.add(tokenizer.eos_token_id)
    ids.add(end_of_turn_token_id(tokenizer))
    return ids - {None}


def render_prompt(tokenizer, messages: Messages) -> list[int]:
    """The conversation with a generation prompt: what the assistant's reply follows."""
    return _apply(tokenizer, messages, add_generation_prompt=True)


def render_conversation(tokenizer, messages: Messages, train_from: int = 0) -> tuple[list[int], list[int]]:
    """(ids, assistant_mask) of the whole conversation: mask 1 on the tokens of every
    assistant turn at index >= train_from (its content and its end-of-turn token), 0 on the
    rest (system and user turns, the template's headers). A turn's tokens are found by
    rendering the conversation up to it with a generation prompt and through it: both must
    be prefixes of the whole, which holds for the templates of common chat models; a
    template for which it does not is refused, never silently mis-masked."""
    ids = _apply(tokenizer, messages, add_generation_prompt=False)
    mask = [0] * len(ids)
    ends = end_token_ids(tokenizer)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < train_from:
            continue
        head = render_prompt(tokenizer, messages[:i]) if i else []
        start = len(head)
        through = _apply(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if ids[:len(through)] != through or through[:start] != head:
            raise ChatFormatError(
                f"messages[{i}]", "the chat template does not render the conversation up to this turn as a "
                "prefix of the whole conversation, so its assistant tokens cannot be located; use a template "
                "that renders earlier turns unchanged")
        end = len(through)
        for j in range(start, end):
            if ids[j] in ends:  # what follows the end-of-turn token (a newline) is the next turn's
                end = j + 1
                break
        mask[start:end] = [1] * (end - start)
    return ids, mask


def as_turns(reply) -> Messages:
    """A reply given as text is one assistant message."""
    return [{"role": "assistant", "content": reply}] if isinstance(reply, str) else reply


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids generation starts from: tokenizer(text) for text, the rendered conversation
    with a generation prompt for messages."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return render_prompt(tokenizer, prompt)


def reply_ids(tokenizer, prompt: Prompt, reply) -> list[int]:
    """The tokens a policy produces after prompt_ids(prompt) to give `reply`: for a text
    prompt, the reply's tokens and EOS; for a conversation, the reply's assistant turn(s) as
    the template renders them, through the last end-of-turn token."""
    if isinstance(prompt, str):
        if not isinstance(reply, str):
            raise ChatFormatError("completion", "a text prompt takes a text completion, got messages")
        return tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    head = render_prompt(tokenizer, prompt)
    ids, mask = render_conversation(tokenizer, prompt + as_turns(reply), train_from=len(prompt))
    if ids[:len(head)] != head:
        raise ChatFormatError("messages", "the chat template renders the prompt differently once the reply "
                              "follows it; the reply's tokens cannot be located")
    last = max((j for j, m in enumerate(mask) if m), default=len(head) - 1)
    return ids[len(head):last + 1]


def reward_ids(tokenizer, prompt: Prompt, reply) -> list[int]:
    """What a reward model reads (its reward is taken at the last token): prompt + reply as
    one text, or the conversation ending with the reply's assistant turn."""
    if isinstance(prompt, str):
        if not isinstance(reply, str):
            raise ChatFormatError("response", "a text prompt takes a text response, got messages")
        return tokenizer(prompt + reply)["input_ids"]
    return _apply(tokenizer, prompt + as_turns(reply), add_generation_prompt=False)
