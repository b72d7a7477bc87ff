"""A model's own tokenizer in-process, so a first-sight prompt needs no /tokenize round trip.

Reads a Hugging Face ``tokenizer.json`` (with the ``tokenizers`` library) and, when it sits
beside it, ``tokenizer_config.json`` for the chat template and special tokens. It tokenizes
the way vLLM does: a completions prompt with the tokenizer's special tokens (BOS), a chat
rendered through the chat template and then tokenized without adding any. Whatever it
cannot reproduce exactly (images, tools, batches of prompts) returns None, and the request
falls back to the engine's /tokenize.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

Tokens = tuple[int, ...]


class TokenizerLoadError(ValueError):
    pass


def _special(value: Any) -> str:
    """tokenizer_config.json writes special tokens as strings or as AddedToken mappings."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _pick_template(value: Any) -> str | None:
    """A template string, or the "default" of a list of named templates."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        chosen = named.get("default")
        return chosen if isinstance(chosen, str) else None
    return None


def _message_text(content: Any) -> str | None:
    """vLLM's "string" content format: text parts joined by newlines; other parts: None."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type", "text") != "text":
                return None  # images, audio: placeholders only the engine knows
            text = part.get("text")
            if not isinstance(text, str):
                return None
            texts.append(text)
        return "\n".join(texts)
    return None


class LocalTokenizer:
    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:  # an optional extra: say how to get it
            raise TokenizerLoadError(
                "needs the tokenizers package: pip install 'kvgate[local-tokenizer]'"
            ) from None
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        try:
            self._tok = Tokenizer.from_file(file)
        except Exception as exc:  # the library raises plain Exceptions on bad files
            raise TokenizerLoadError(f"cannot load {file}: {str(exc)[:80]}") from None
        self.path = file
        self.chat_template: str | None = None
        self.bos_token = self.eos_token = ""
        cfg_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            try:
                with open(cfg_file, encoding="utf-8") as fh:
                    cfg = json.load(fh)
            except (OSError, ValueError) as exc:
                raise TokenizerLoadError(f"cannot read {cfg_file}: {exc}") from None
            if isinstance(cfg, dict):
                self.chat_template = _pick_template(cfg.get("chat_template"))
                self.bos_token = _special(cfg.get("bos_token"))
                self.eos_token = _special(cfg.get("eos_token"))
        self._template: Any = None
        if self.chat_template is not None:
            self._template = _compile(self.chat_template)

    def encode_prompt(self, text: str) -> Tokens:
        return tuple(self._tok.encode(text, add_special_tokens=True).ids)

    def render_chat(self, messages: list[Any]) -> str | None:
        if self._template is None:
            return None
        plain: list[dict[str, str]] = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                return None
            text = _message_text(m.get("content"))
            if text is None:
                return None
            plain.append({"role": m["role"], "content": text})
        try:
            return self._template.render(messages=plain, add_generation_prompt=True,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception:  # a template's raise_exception, or one we cannot run
            return None

    def encode_chat(self, messages: list[Any]) -> Tokens | None:
        text = self.render_chat(messages)
        if text is None:
            return None
        # vLLM renders the template to text, then tokenizes it without special tokens
        return tuple(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_body(self, payload: Mapping[str, Any]) -> Tokens | None:
        """Tokens for a completions or chat body; None when only the engine can say."""
        prompt = payload.get("prompt")
        if isinstance(prompt, str):
            return self.encode_prompt(prompt) if prompt else None
        if prompt is None and isinstance(payload.get("messages"), list):
            if payload.get("tools") or payload.get("chat_template"):
                return None
            return self.encode_chat(payload["messages"])
        return None


def _raise(message: str) -> None:
    raise ValueError(message)


def _compile(source: str) -> Any:
    """Compile like transformers does: sandboxed, trimmed blocks, loop controls."""
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise TokenizerLoadError("chat templates need jinja2") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False,
                                                             indent=indent)
    try:
        return env.from_string(source)
    except Exception as exc:
        raise TokenizerLoadError(f"chat template does not compile: {str(exc)[:80]}") from None
