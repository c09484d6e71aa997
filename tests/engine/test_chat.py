"""Chat in process: ``LLM.chat`` renders conversations with the model's chat template,
never doubles a BOS, and refuses what the template cannot render with a clear error."""

from __future__ import annotations

import json
import shutil

import pytest

from lorafleet.producer import SamplingParams
from lorafleet.producer.errors import InvalidRequestError
from lorafleet.worker import LLM
from lorafleet.worker.demo.synthetic import build_tokenizer

GREEDY = SamplingParams(max_tokens=6, temperature=0)
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def bos_model(llama_dir, tmp_path_factory):
    """The tiny model with a Llama 3 style tokenizer: it adds a BOS, and so does its chat
    template."""
    folder = tmp_path_factory.mktemp("bos") / "model"
    shutil.copytree(llama_dir, folder)
    build_tokenizer(folder, add_bos=True)
    return folder


@pytest.fixture(scope="module")
def llm(bos_model) -> LLM:
    return LLM(str(bos_model), max_model_len=128, device="cpu")


def test_chat_renders_the_template_with_one_bos(llm):
    tokenizer = llm.get_tokenizer()
    bos = tokenizer.bos_token_id
    (out,) = llm.chat(HELLO, GREEDY)
    rendered = tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    assert out.prompt == rendered == "<|bos|>user: hello\nassistant: "
    assert out.prompt_token_ids[0] == bos and out.prompt_token_ids[1] != bos
    # A producer that rendered the template itself and sends the text gets the same ids.
    (plain,) = llm.generate(rendered, GREEDY)
    assert plain.prompt_token_ids == out.prompt_token_ids
    assert plain.outputs[0].token_ids == out.outputs[0].token_ids
    # A plain prompt still gets the tokenizer's BOS (vLLM's rule for generate).
    (raw,) = llm.generate("hello", GREEDY)
    assert raw.prompt_token_ids[0] == bos and raw.prompt_token_ids[1] != bos


def test_chat_takes_one_conversation_or_a_list_in_order(llm):
    second = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "queue"}]
    both = llm.chat([HELLO, second], GREEDY)
    assert [o.prompt for o in both] == [llm.chat(c, GREEDY)[0].prompt for c in (HELLO, second)]
    assert both[1].prompt.startswith("<|bos|>system: be brief\nuser: queue\n")


def test_continue_final_message_extends_the_assistant_turn(llm):
    chat = [*HELLO, {"role": "assistant", "content": "hi th"}]
    (out,) = llm.chat(chat, GREEDY, add_generation_prompt=False, continue_final_message=True)
    assert out.prompt.endswith("assistant: hi th")
    with pytest.raises(ValueError, match="continue_final_message needs add_generation_prompt"):
        llm.chat(chat, GREEDY, continue_final_message=True)


@pytest.mark.parametrize(
    "messages, message",
    [
        ("hello", "a conversation is a list of messages"),
        ([], "at least one message"),
        ([{"role": "user"}], 'message 0 must be a dict with "role" and "content"'),
        ([{"role": "", "content": "x"}], "message 0: a chat message needs a non-empty role"),
    ],
)
def test_malformed_conversations_name_the_problem(llm, messages, message):
    with pytest.raises(ValueError, match=message):
        llm.chat(messages, GREEDY)


def test_a_template_that_refuses_a_conversation_is_a_request_error(bos_model, tmp_path):
    folder = tmp_path / "strict"
    shutil.copytree(bos_model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m['role'] not in ('user', 'assistant') %}"
        "{{ raise_exception('roles must be user or assistant') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    llm = LLM(str(folder), max_model_len=128, device="cpu")
    with pytest.raises(InvalidRequestError, match="roles must be user or assistant"):
        llm.chat([{"role": "system", "content": "x"}], GREEDY)
    assert llm.chat(HELLO, GREEDY)[0].prompt == "hello"
    assert not llm.engine.has_unfinished()


def test_a_model_without_a_chat_template_says_so(llama_dir, tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(llama_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    llm = LLM(str(folder), max_model_len=128, device="cpu")
    with pytest.raises(InvalidRequestError, match="has no chat template: send a plain prompt"):
        llm.chat(HELLO, GREEDY)
