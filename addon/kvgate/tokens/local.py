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
from datetime import datetime
from typing import Any

Tokens = tuple[int, ...]

# request fields that change how vLLM renders or tokenizes a chat: left to the engine
_CHAT_ONLY_ENGINE = ("tools", "documents", "chat_template", "chat_template_kwargs",
                     "continue_final_message", "mm_processor_kwargs")
_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
             "mask_token")


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
    """Plain string content only. Content parts are left to the engine: vLLM passes them to
    the template joined or as a list depending on what it detects in the template."""
    return content if isinstance(content, str) else None


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
        self.specials: dict[str, str] = {}
        cfg_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            try:
                with open(cfg_file, encoding="utf-8") as fh:
                    cfg = json.load(fh)
            except (OSError, ValueError) as exc:
                raise TokenizerLoadError(f"cannot read {cfg_file}: {exc}") from None
            if isinstance(cfg, dict):
                self.chat_template = _pick_template(cfg.get("chat_template"))
                self.specials = {name: _special(cfg.get(name)) for name in _SPECIALS
                                 if _special(cfg.get(name))}
        self._template: Any = None
        if self.chat_template is not None:
            self._template = _compile(self.chat_template)

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> Tokens:
        # encode_batch lets go of the GIL while it works (encode does not)
        return tuple(self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0]
                     .ids)

    def render_chat(self, messages: list[Any], add_generation_prompt: bool = True) -> str | None:
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
        try:  # the variables transformers' apply_chat_template passes
            return self._template.render(messages=plain, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **self.specials)
        except Exception:  # a template's raise_exception, or one we cannot run
            return None

    def encode_chat(self, messages: list[Any], add_generation_prompt: bool = True,
                    add_special_tokens: bool = False) -> Tokens | None:
        text = self.render_chat(messages, add_generation_prompt)
        if text is None:
            return None
        # vLLM renders the template to text, then tokenizes it without special tokens
        # unless the request asks for them
        return self.encode_prompt(text, add_special_tokens)

    def encode_body(self, payload: Mapping[str, Any]) -> Tokens | None:
        """Tokens for a completions or chat body; None when only the engine can say."""
        prompt = payload.get("prompt")
        special = payload.get("add_special_tokens")
        if special is not None and not isinstance(special, bool):
            return None
        if isinstance(prompt, str):
            return self.encode_prompt(prompt, special is not False) if prompt else None
        if prompt is None and isinstance(payload.get("messages"), list):
            if any(payload.get(name) is not None for name in _CHAT_ONLY_ENGINE):
                return None
            gen = payload.get("add_generation_prompt", True)
            if not isinstance(gen, bool):
                return None
            return self.encode_chat(payload["messages"], gen, special is True)
        return None


def _raise(message: str) -> None:
    raise ValueError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' tojson filter (not jinja2's HTML-escaping one)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _generation_extension() -> Any:
    """``{% generation %}...{% endgeneration %}`` (assistant masks in training templates)
    renders its body unchanged, as transformers does when not asked for masks."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return Generation


def _compile(source: str) -> Any:
    """Compile like transformers does: sandboxed, trimmed blocks, loop controls."""
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise TokenizerLoadError("chat templates need jinja2") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _generation_extension()])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(source)
    except Exception as exc:
        raise TokenizerLoadError(f"chat template does not compile: {str(exc)[:80]}") from None
