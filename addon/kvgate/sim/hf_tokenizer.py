"""A small Hugging Face tokenizer directory, made on the spot, for trying local tokenization
without downloading a model: ``tokenizer.json`` (a BPE trained on generated text, BOS added
like Llama's) and ``tokenizer_config.json`` with a chat template.

Simulated engines started with ``--tokenizer DIR`` tokenize with it too, so the gateway's
in-process tokens can be checked against the engine's.
"""

from __future__ import annotations

import json
import os
import random

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_TEXT = """
the a of to and in is it you that he was for on are with as his they be at one have this
from or had by word but what some we can out other were all there when up use your how
said an each she which do their time if will way about many then them write would like
so these her long make thing see him two has look more day could go come cache engine
prefix token route model prompt system user assistant answer question
"""


def _corpus(lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = _TEXT.split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30)))
            for _ in range(lines)]


def make_tokenizer_dir(path: str, vocab_size: int = 1000, seed: int = 7) -> str:
    """Write tokenizer.json and tokenizer_config.json into ``path``; returns ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    os.makedirs(path, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(2000, seed), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump({"bos_token": "<s>", "eos_token": {"content": "</s>"},
                   "chat_template": CHAT_TEMPLATE}, fh, indent=1)
    return path
