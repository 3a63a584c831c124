"""``POST /classify`` (vLLM's shape) for adapters with classification heads and PET, through an HTTP client:
the probabilities equal ``Engine.classify`` (itself equal to PEFT's, tests/test_encoder_heads.py), with
the server's errors and limits."""

from __future__ import annotations

import httpx
import pytest
from test_encoder_heads import _make, _peft_configs, bases, peft_sees_the_cache_argument  # noqa: F401

import adaptkit as ak
from adaptkit.serving.guards import Limits
from adaptkit.serving.server import BackgroundServer, Server

TEXTS = ["the quick brown fox", "SELECT name", "adaptkit serves many adapters over one base model"]


@pytest.fixture(scope="module")
def served(bases, tmp_path_factory):  # noqa: F811
    base, cls = bases["bert", "SEQ_CLS"]
    folder = tmp_path_factory.mktemp("classify")
    paths = {kind: _make(cls, base, config, folder / kind, seed=i)
             for i, (kind, config) in enumerate(_peft_configs("SEQ_CLS", "bert").items()) if kind != "prefix"}
    engine = ak.Engine.from_pretrained(base)
    reference = ak.Engine.from_pretrained(base)
    for kind, path in paths.items():
        reference.add_adapter(kind, path)
    server = Server(engine, adapters=paths, limits=Limits(max_prompt_chars=200), max_batch=2)
    with BackgroundServer(server) as running:
        yield running.url, reference, server.base_name


def test_classify_route_equals_the_engine(served):
    url, reference, base_name = served
    for model in ("lora", "prompt", "ptuning", base_name):
        response = httpx.post(f"{url}/classify", json={"model": model, "input": TEXTS}, timeout=60)
        assert response.status_code == 200, response.text
        body = response.json()
        expected = reference.classify(TEXTS, adapter=[None if model == base_name else model] * len(TEXTS))
        assert body["object"] == "list" and body["model"] == model and len(body["data"]) == len(TEXTS)
        for row, probs in zip(body["data"], expected):
            assert row["labels"] == ["neg", "neu", "pos"] and row["num_classes"] == 3
            assert max(abs(a - b) for a, b in zip(row["probs"], probs.values())) < 1e-5
            assert row["label"] == max(probs, key=probs.get)
        assert body["usage"]["prompt_tokens"] > 0
    one = httpx.post(f"{url}/v1/classify", json={"model": "lora", "input": TEXTS[0]}, timeout=60).json()
    assert len(one["data"]) == 1


def test_classify_errors(served):
    url, _, _ = served
    unknown = httpx.post(f"{url}/classify", json={"model": "nope", "input": "x"}, timeout=60)
    assert unknown.status_code == 404 and "known models" in unknown.json()["error"]["message"]
    empty = httpx.post(f"{url}/classify", json={"model": "lora", "input": []}, timeout=60)
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "input"
    long = httpx.post(f"{url}/classify", json={"model": "lora", "input": "x" * 500}, timeout=60)
    assert long.status_code == 400 and "--max-prompt-chars" in long.json()["error"]["message"]
