"""A tiny random-weight Llama with a locally trained tokenizer, for real vLLM on a CPU.

Nothing is downloaded from any model hub: the tokenizer (byte-level BPE, ~3k tokens, BOS
added like Llama's, a chat template) is trained here on seeded generated text, and the
weights are drawn from a seeded generator. The same recipe gives the same files, byte for
byte, so every machine serves the same model and tokenizes the same way. The text it
generates is noise; serving, prefix caching, KV transfer and timing are real.

Shape: hidden 128, 4 heads (head size 32: vLLM's CPU attention takes 32, 64, 80, ... 512
only), 2 KV heads, intermediate 256, 2 layers, 4096 positions, bfloat16.

    python -m vllmcpu.tiny_model DIR      # builds DIR unless it already holds this recipe
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

NAME = "kvgate-tiny-llama"
STAMP = ".kvgate-tiny-model.json"

# Change anything here (or the build code) and bump "version": the stamp no longer matches
# and the next build writes the folder afresh.
RECIPE: dict[str, Any] = {
    "version": 1,
    "seed": 1234,
    "vocab_size": 3000,
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "max_position_embeddings": 4096,
    "dtype": "bfloat16",
    "corpus_lines": 6000,
}

# Zephyr-like; the same shape kvgate's simulator tokenizer uses. vLLM renders it, then
# tokenizes the text without adding special tokens: the template writes the BOS itself.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

_TEXT = (
    "the a of to and in is it you that he was for on are with as his they be at one have this "
    "from or had by word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like "
    "so these her long make thing see him two has look more day could go come cache engine "
    "prefix token route model prompt system user assistant answer question first second turn "
    "again policy document chapter section table value number request response server client"
)


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:16]


def _corpus(rng: random.Random, lines: int) -> list[str]:
    """English words plus seeded pseudo-words (enough distinct ones for ~3k merges),
    digits and punctuation, so any prompt a test writes tokenizes compactly."""
    syll = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "st", "er", "on"]
    pseudo = sorted({"".join(rng.choice(syll) for _ in range(rng.randint(1, 3)))
                     for _ in range(3000)})
    vocab = _TEXT.split() * 8 + pseudo
    punct = [".", ",", "?", "!", ":", ";", "-", "(", ")", "'", '"', "/", "=", "_"]
    out = []
    for _ in range(lines):
        parts = []
        for _ in range(rng.randint(4, 24)):
            r = rng.random()
            if r < 0.08:
                parts.append(str(rng.randint(0, 9999)))
            elif r < 0.14:
                parts.append(rng.choice(punct))
            else:
                w = rng.choice(vocab)
                parts.append(w.capitalize() if rng.random() < 0.1 else w)
        out.append(" ".join(parts))
    return out


def _build_tokenizer(dest: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rng = random.Random(RECIPE["seed"])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=RECIPE["vocab_size"], special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=1, show_progress=False)
    tok.train_from_iterator(_corpus(rng, RECIPE["corpus_lines"]), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tok.save(str(dest / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": RECIPE["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    (dest / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=1) + "\n")
    return tok.get_vocab_size()


def _build_model(dest: Path, vocab: int, bos: int, eos: int) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(RECIPE["seed"])
    h, inter, layers = (RECIPE["hidden_size"], RECIPE["intermediate_size"],
                        RECIPE["num_hidden_layers"])
    heads, kv_heads = RECIPE["num_attention_heads"], RECIPE["num_key_value_heads"]
    head = h // heads
    dtype = getattr(torch, RECIPE["dtype"])

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    # Written tensor by tensor (not through transformers' save_pretrained) so the bytes
    # depend only on the seed, never on a transformers release's init order or metadata.
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = torch.ones(h, dtype=dtype)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
        w[p + "self_attn.q_proj.weight"] = normal(heads * head, h)
        w[p + "self_attn.k_proj.weight"] = normal(kv_heads * head, h)
        w[p + "self_attn.v_proj.weight"] = normal(kv_heads * head, h)
        w[p + "self_attn.o_proj.weight"] = normal(h, heads * head)
        w[p + "mlp.gate_proj.weight"] = normal(inter, h)
        w[p + "mlp.up_proj.weight"] = normal(inter, h)
        w[p + "mlp.down_proj.weight"] = normal(h, inter)
    w["model.norm.weight"] = torch.ones(h, dtype=dtype)
    w["lm_head.weight"] = normal(vocab, h)
    save_file(dict(sorted(w.items())), str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": h, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head, "hidden_act": "silu",
        "max_position_embeddings": RECIPE["max_position_embeddings"],
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": False, "initializer_range": 0.02,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": None,
        "torch_dtype": RECIPE["dtype"], "dtype": RECIPE["dtype"], "use_cache": True,
    }
    (dest / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    (dest / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos, "eos_token_id": eos}, indent=1) + "\n")


def is_built(model_dir: str | os.PathLike[str]) -> bool:
    stamp = Path(model_dir) / STAMP
    try:
        return json.loads(stamp.read_text()).get("hash") == recipe_hash()
    except (OSError, ValueError):
        return False


def build(model_dir: str | os.PathLike[str], quiet: bool = False) -> Path:
    """Make ``model_dir`` hold the tiny model; a no-op when it already holds this recipe.

    Built in a sibling temp folder and renamed into place, so a reader never sees half a
    model and two builders racing both end with the same bytes.
    """
    dest = Path(model_dir).resolve()
    if is_built(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-model-", dir=dest.parent))
    try:
        vocab = _build_tokenizer(tmp)
        from tokenizers import Tokenizer

        t = Tokenizer.from_file(str(tmp / "tokenizer.json"))
        _build_model(tmp, vocab, t.token_to_id("<s>"), t.token_to_id("</s>"))
        (tmp / STAMP).write_text(json.dumps({"name": NAME, "hash": recipe_hash(),
                                             "recipe": RECIPE}, indent=1) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_built(dest):  # someone else finished the same build first
            return dest
        raise
    if not quiet:
        print(f"[tiny-model] built {NAME} ({vocab} tokens) in {dest}", file=sys.stderr)
    return dest


def digest(model_dir: str | os.PathLike[str]) -> dict[str, str]:
    """sha256 of every file the engines read: for checking that builds are reproducible."""
    d = Path(model_dir)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(d.iterdir()) if p.is_file() and p.name != STAMP}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m vllmcpu.tiny_model DIR")
    out = build(sys.argv[1])
    print(json.dumps(digest(out), indent=1))
