"""In-process tokenization: vLLM's rules, and no /tokenize round trip on the request path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvgate.config import ConfigError, from_mapping
from kvgate.gateway import Gateway
from kvgate.sim.hf_tokenizer import make_tokenizer_dir
from kvgate.tokens.local import LocalTokenizer

from unit_support import calls, gateway_doc, paths


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tokenizer_dir(str(tmp_path_factory.mktemp("tok")))


def _chat(*contents: str) -> list[dict]:
    roles = ["system", "user", "assistant", "user", "assistant", "user"]
    return [{"role": roles[i], "content": c} for i, c in enumerate(contents)]


def test_completions_prompt_gets_the_tokenizers_bos(tok_dir: str) -> None:
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
    lt = LocalTokenizer(tok_dir)
    tokens = lt.encode_body({"prompt": "the cache engine routes"})
    assert tokens == tuple(raw.encode("the cache engine routes").ids)
    assert tokens is not None and tokens[0] == raw.token_to_id("<s>")


def test_chat_is_rendered_by_the_template_then_tokenized_without_specials(tok_dir: str) -> None:
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
    lt = LocalTokenizer(str(Path(tok_dir) / "tokenizer.json"))  # the file form finds the config
    msgs = _chat("be brief", "what is a cache")
    text = lt.render_chat(msgs)
    assert text == ("<s><|system|>\nbe brief</s>\n<|user|>\nwhat is a cache</s>\n"
                    "<|assistant|>\n")
    assert lt.encode_body({"messages": msgs}) == tuple(
        raw.encode(text, add_special_tokens=False).ids)
    # content parts: vLLM joins them or passes a list, by what it detects in the template
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}]}]
    assert lt.encode_chat(parts) is None


def test_what_only_the_engine_knows_is_left_to_it(tok_dir: str) -> None:
    lt = LocalTokenizer(tok_dir)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert lt.encode_body({"messages": image}) is None
    assert lt.encode_body({"messages": _chat("a"), "tools": [{"type": "function"}]}) is None
    assert lt.encode_body({"prompt": ["a", "b"]}) is None  # a batch
    assert lt.encode_body({"prompt": ""}) is None
    assert lt.encode_body({"messages": [{"content": "no role"}]}) is None


def test_a_tokenizer_without_chat_template_does_completions_only(tmp_path: Path,
                                                                 tok_dir: str) -> None:
    (tmp_path / "tokenizer.json").write_bytes((Path(tok_dir) / "tokenizer.json").read_bytes())
    lt = LocalTokenizer(str(tmp_path))
    assert lt.encode_body({"messages": _chat("hi")}) is None
    assert lt.encode_body({"prompt": "hi"})


def test_bad_tokenizer_paths_are_one_line_config_errors(tmp_path: Path, engine,
                                                        controller) -> None:
    doc = gateway_doc(engine.url, controller.url, {"tokenizers": {"m": str(tmp_path / "no")}})
    with pytest.raises(ConfigError, match=r"tokenizers\.m=.*no such file"):
        from_mapping(doc)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    doc = gateway_doc(engine.url, controller.url, {"tokenizers": {"m": str(bad)}})
    with pytest.raises(ConfigError, match=r"tokenizers\.m=.*cannot load"):
        Gateway(from_mapping(doc))
    doc = gateway_doc(engine.url, controller.url, {"tokenizers": ["m"]})
    with pytest.raises(ConfigError, match="must map names"):
        from_mapping(doc)


def test_relative_tokenizer_paths_are_read_from_the_configs_folder(tmp_path: Path,
                                                                   tok_dir: str) -> None:
    cfg_dir = tmp_path / "conf"
    cfg_dir.mkdir()
    (cfg_dir / "tok").symlink_to(tok_dir)
    doc = gateway_doc("http://127.0.0.1:1", "http://127.0.0.1:2", {"tokenizers": {"m": "tok"}})
    cfg = from_mapping(doc, str(cfg_dir / "kvgate.yaml"))
    assert cfg.kvcache.tokenizers["m"] == str(cfg_dir / "tok")


def test_first_sight_routes_on_local_tokens_without_tokenize(make_gateway, engine, controller,
                                                            tok_dir: str) -> None:
    gw = make_gateway({"token_cache": {"enabled": True}, "tokenizers": {"m": tok_dir}})
    body = json.dumps({"model": "m", "prompt": "the cache engine routes a prompt"}).encode()
    routed = gw.route("vllm", body)
    expected = LocalTokenizer(tok_dir).encode_body({"prompt": "the cache engine routes a prompt"})
    assert routed.tokens == expected
    assert "/tokenize" not in paths(engine)
    assert calls(controller, "/lookup")[-1]["tokens"] == list(expected)
    assert gw.counters.get("tokenize.local") == 1
    # a model without a local tokenizer still asks the engine
    other = json.dumps({"model": "other", "prompt": "the cache"}).encode()
    gw.route("vllm", other)
    assert "/tokenize" in paths(engine)


def test_background_work_tokenizes_locally_too(make_gateway, engine, controller,
                                               tok_dir: str) -> None:
    gw = make_gateway({"token_cache": {"enabled": True}, "route_on_miss": False,
                       "tokenizers": {"m": tok_dir}})
    body = json.dumps({"model": "m", "messages": _chat("sys", "q")}).encode()
    routed = gw.route("vllm", body)
    assert routed.tokens is None  # the seed's rule: no routing on first sight
    gw.cache.manage(gw.job(routed), __import__("threading").Event())
    assert "/tokenize" not in paths(engine)
    assert gw.token_cache.peek(routed.key) == LocalTokenizer(tok_dir).encode_body(
        {"messages": _chat("sys", "q")})


def test_request_fields_that_change_vllms_tokens(tok_dir: str) -> None:
    lt = LocalTokenizer(tok_dir)
    with_bos = lt.encode_body({"prompt": "the cache"})
    assert with_bos is not None
    assert lt.encode_body({"prompt": "the cache", "add_special_tokens": False}) == with_bos[1:]
    msgs = _chat("sys", "q")
    no_gen = lt.render_chat(msgs, add_generation_prompt=False)
    assert no_gen is not None and not no_gen.endswith("<|assistant|>\n")
    assert lt.encode_body({"messages": msgs, "add_generation_prompt": False}) == \
        lt.encode_prompt(no_gen, False)
    for field, value in (("chat_template_kwargs", {"enable_thinking": False}),
                         ("continue_final_message", True), ("documents", [{"t": "x"}]),
                         ("add_special_tokens", "yes")):
        assert lt.encode_body({"messages": msgs, field: value}) is None, field


def test_templates_get_what_transformers_gives_them(tmp_path: Path, tok_dir: str) -> None:
    (tmp_path / "tokenizer.json").write_bytes((Path(tok_dir) / "tokenizer.json").read_bytes())
    template = ("{% if tools is not none %}TOOLS{% endif %}{{ unk_token }}"
                "{{ strftime_now('%Y') }}{% for m in messages %}"
                "{% generation %}{{ m['content'] | tojson }}{% endgeneration %}{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<s>", "unk_token": "<unk>"}))
    lt = LocalTokenizer(str(tmp_path))
    import datetime

    assert lt.render_chat([{"role": "user", "content": "h\u00e9"}]) == \
        f"<unk>{datetime.datetime.now():%Y}\"h\u00e9\""
