"""``adaptkit serve`` on encoder-decoders (T5, BART): the completions and chat routes, concurrent requests
for different adapters (LoRA, prompt, prefix) decoded together in waves, each equal to the request alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from test_seq2seq import _lora, _prompt, seq2seq_bases  # noqa: F401

import adaptkit as ak
from adaptkit.chat import chat_prompt_ids
from adaptkit.serving.server import BackgroundServer, Server

PROMPTS = ["the quick brown", "SELECT name FROM", "adaptkit serves", "LoRA adds", "0123", "Prefix tuning"]


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_concurrent_requests_equal_each_alone(family, seq2seq_bases, tmp_path):  # noqa: F811
    base, cls, targets = seq2seq_bases[family]
    paths = {"lora": _lora(cls, base, targets, tmp_path / "lora", 1),
             "prompt": _prompt(cls, base, "prompt", tmp_path / "prompt", 2)}
    reference = ak.Engine.from_pretrained(base)
    for name, path in paths.items():
        reference.add_adapter(name, path)
    server = Server(ak.Engine.from_pretrained(base), adapters=paths, max_batch=4)
    models = ["lora", "prompt", server.base_name]
    jobs = [(PROMPTS[i % len(PROMPTS)], models[i % 3]) for i in range(12)]
    with BackgroundServer(server) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)

        def ask(job):
            prompt, model = job
            return client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0).choices[0].text

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, jobs))
        chat = client.chat.completions.create(model="lora", messages=[{"role": "user", "content": "SELECT name"}],
                                              max_tokens=6, temperature=0).choices[0].message.content
    for (prompt, model), answer in zip(jobs, answers):
        entry = None if model == server.base_name else model
        assert answer == reference.generate([prompt], adapters=[entry], max_new_tokens=6)[0], (prompt, model)
    ids = chat_prompt_ids(reference.tokenizer, [{"role": "user", "content": "SELECT name"}])
    tokens = reference.generate_ids([ids], adapters=["lora"], max_new_tokens=6)[0]
    assert chat == reference.tokenizer.decode(tokens, skip_special_tokens=True)
