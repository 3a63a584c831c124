"""OpenAI API parity of ``adaptkit serve``: logprobs and echo, n / best_of, penalties, models/{id}.

References: the engine's own ``log_softmax`` of its logits (``Engine.score``), the engine's generation
of each choice alone, and a plain re-implementation of the penalties here.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from serve_helpers import KINDS, reference_engine, write_adapters

import adaptkit as ak
from adaptkit.serving.server import BackgroundServer, Server

PROMPT = [5, 6, 7, 8, 9]
TOL = 1e-5  # fp32: the server's incremental decode vs one full forward differ by summation order only


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai-adapters")
    write_adapters(tiny_llama, root)
    return root


@pytest.fixture(scope="module")
def ref(tiny_llama, adapter_dir):
    return reference_engine(tiny_llama, {name: adapter_dir / name for name in KINDS})


@pytest.fixture(scope="module")
def running(tiny_llama, adapter_dir):
    engine = ak.Engine.from_pretrained(tiny_llama)
    server = Server(engine, {name: adapter_dir / name for name in KINDS}, max_batch=16)
    with BackgroundServer(server) as bg:
        yield bg


def post(running, path: str, **body) -> dict:
    answer = httpx.post(running.url + path, content=json.dumps(body), headers={"content-type": "application/json"},
                        timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()


def entry_of(model: str, mix=None):
    return ak.Mix(mix) if mix else (None if model == "base" else model)


@pytest.mark.parametrize("model, mix", [("base", None), ("lora", None), ("prefix", None), ("prompt", None),
                                        ("bottleneck", None), ("base", {"lora": 0.6, "bottleneck": 0.5})])
def test_logprobs_and_echo_equal_the_engine_for_every_kind(running, ref, model, mix):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 3,
            "echo": True, **({"adapters": mix} if mix else {})}
    others = [{"model": m, "prompt": [9, 10, 11], "max_tokens": 8, "temperature": 0} for m in KINDS]
    with ThreadPoolExecutor(5) as pool:  # batched with other requests
        futures = [pool.submit(post, running, "/v1/completions", **b) for b in [body, *others]]
        answer = futures[0].result()
        [f.result() for f in futures[1:]]
    choice = answer["choices"][0]
    logprobs = choice["logprobs"]
    entry = entry_of(model, mix)
    generated = ref.generate_ids([PROMPT], [entry], max_new_tokens=6, eos_token_id=-1)[0]
    expected = ref.score([PROMPT + generated], adapters=[entry], top=3)[0]
    assert len(logprobs["token_logprobs"]) == len(PROMPT) + 6
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    torch.testing.assert_close(torch.tensor(logprobs["token_logprobs"][1:]), torch.tensor(expected.logprobs[1:]),
                               atol=TOL, rtol=0)
    tokenizer = ref.tokenizer
    for position, alternatives in enumerate(expected.top[1:], start=1):  # OpenAI's shape: keyed by token text
        wanted = {tokenizer.decode([t]): v for t, v in alternatives}
        wanted.setdefault(tokenizer.decode([expected.token_ids[position]]), expected.logprobs[position])
        got = logprobs["top_logprobs"][position]
        assert got.keys() == wanted.keys() and all(abs(got[k] - wanted[k]) < TOL for k in got)
    assert logprobs["tokens"] == [tokenizer.decode([t]) for t in PROMPT + generated]
    assert choice["text"] == tokenizer.decode(PROMPT) + tokenizer.decode(generated)
    assert logprobs["text_offset"] == [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(len(PROMPT) + 6)]


def test_echo_with_max_tokens_0_and_batched_token_prompts(running, ref):
    """What lm-evaluation-harness sends for loglikelihood: token-id prompts, echo, logprobs, max_tokens 0 or 1."""
    prompts = [[5, 6, 7, 8], [20, 21, 22], [30, 31, 32, 33, 34]]
    answer = post(running, "/v1/completions", model="lora", prompt=prompts, max_tokens=0, echo=True, logprobs=1)
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    expected = ref.score(prompts, adapters="lora", top=1)
    for choice, scores in zip(answer["choices"], expected):
        got = choice["logprobs"]["token_logprobs"]
        assert got[0] is None and len(got) == len(scores.logprobs)
        torch.testing.assert_close(torch.tensor(got[1:]), torch.tensor(scores.logprobs[1:]), atol=TOL, rtol=0)
    one = post(running, "/v1/completions", model="lora", prompt=prompts, max_tokens=1, echo=True, logprobs=1)
    assert [len(c["logprobs"]["token_logprobs"]) for c in one["choices"]] == [len(p) + 1 for p in prompts]


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_equal_the_whole_answer(running, echo):
    body = {"model": "prefix", "prompt": PROMPT, "max_tokens": 7, "temperature": 0, "ignore_eos": True,
            "logprobs": 2, "echo": echo}
    whole = post(running, "/v1/completions", **body)["choices"][0]["logprobs"]
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    with httpx.stream("POST", running.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                logprobs = json.loads(line[6:])["choices"][0]["logprobs"]
                for key in streamed:
                    streamed[key] += logprobs[key] if logprobs else []
    assert streamed == whole


def test_chat_logprobs_in_openai_chat_format(running, ref):
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "LoRA adds what?"}]
    answer = client.chat.completions.create(model="bottleneck", messages=messages, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = answer.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 for t in content)
    from adaptkit.chat import chat_prompt_ids

    prompt = chat_prompt_ids(ref.tokenizer, messages)
    generated = ref.generate_ids([prompt], ["bottleneck"], max_new_tokens=5, eos_token_id=-1)[0]
    expected = ref.score([prompt + generated], adapters="bottleneck", top=2)[0]
    for token, token_id, value, top in zip(content, generated, expected.logprobs[len(prompt):],
                                           expected.top[len(prompt):]):
        assert token.token == ref.tokenizer.decode([token_id]) and abs(token.logprob - value) < TOL
        assert token.bytes == list(token.token.encode("utf-8"))
        assert [abs(t.logprob - v) < TOL for t, (_, v) in zip(token.top_logprobs, top)] == [True, True]


def test_n_and_best_of_with_seeds(running, ref):
    body = {"model": "lora", "prompt": PROMPT, "max_tokens": 6, "temperature": 0.9, "seed": 11, "ignore_eos": True}
    answer = post(running, "/v1/completions", n=3, **body)
    texts = [c["text"] for c in answer["choices"]]
    alone = [ref.generate_ids([PROMPT], ["lora"], max_new_tokens=6, temperature=0.9, seed=11 + j,
                              eos_token_id=-1)[0] for j in range(3)]
    assert texts == [ref.tokenizer.decode(a, skip_special_tokens=True) for a in alone]
    assert len(set(texts)) > 1  # the choices are sampled independently
    assert [c["text"] for c in post(running, "/v1/completions", n=3, **body)["choices"]] == texts  # reproducible
    best = post(running, "/v1/completions", n=1, best_of=3, **body)["choices"]
    scores = [sum(ref.score([PROMPT + a], adapters="lora")[0].logprobs[len(PROMPT):]) for a in alone]
    assert len(best) == 1 and best[0]["text"] == texts[max(range(3), key=lambda j: scores[j])]


def shaped_reference(ref, entry, prompt, steps, presence=0.0, frequency=0.0, repetition=1.0, bias=None,
                     min_tokens=0, stop=()):
    """Greedy decoding with the penalties written out plainly, one full forward per token."""
    tokens = []
    for _ in range(steps):
        logits = ref.logits(torch.tensor([prompt + tokens]), adapters=[entry])[0, -1].double()
        for token_id, value in (bias or {}).items():
            logits[token_id] += value
        if len(tokens) < min_tokens:
            for token_id in stop:
                logits[token_id] = float("-inf")
        for token_id in set(prompt + tokens):
            logits[token_id] = logits[token_id] / repetition if logits[token_id] > 0 else logits[token_id] * repetition
        for token_id in set(tokens):
            logits[token_id] -= frequency * tokens.count(token_id) + presence
        tokens.append(int(logits.argmax()))
    return tokens


@pytest.mark.parametrize("fields", [{"presence_penalty": 1.5}, {"frequency_penalty": 1.2},
                                    {"repetition_penalty": 1.8}, {"logit_bias": {"40": 6.0, "41": -100}},
                                    {"frequency_penalty": 0.7, "presence_penalty": 0.5, "repetition_penalty": 1.3}])
def test_penalties_equal_a_plain_reference(running, ref, fields):
    answer = post(running, "/v1/completions", model="prompt", prompt=PROMPT, max_tokens=10, temperature=0,
                  ignore_eos=True, logprobs=0, **fields)
    bias = {int(k): v for k, v in fields.get("logit_bias", {}).items()}
    expected = shaped_reference(ref, "prompt", PROMPT, 10, fields.get("presence_penalty", 0.0),
                                fields.get("frequency_penalty", 0.0), fields.get("repetition_penalty", 1.0), bias)
    assert answer["choices"][0]["logprobs"]["tokens"] == [ref.tokenizer.decode([t]) for t in expected]
    plain = ref.generate_ids([PROMPT], ["prompt"], max_new_tokens=10, eos_token_id=-1)[0]
    assert expected != plain  # the penalty changed the output


def test_min_tokens_holds_back_the_end_of_sequence(running, ref):
    eos = ref.tokenizer.eos_token_id
    answer = post(running, "/v1/completions", model="base", prompt=PROMPT, max_tokens=6, temperature=0,
                  logit_bias={str(eos): 100}, min_tokens=3, logprobs=0)
    tokens = answer["choices"][0]["logprobs"]["tokens"]
    assert len(tokens) == 4 and answer["choices"][0]["finish_reason"] == "stop"  # 3 tokens, then eos
    expected = shaped_reference(ref, None, PROMPT, 3, bias={eos: 100}, min_tokens=3, stop=(eos,))
    assert tokens[:3] == [ref.tokenizer.decode([t]) for t in expected]


def test_models_by_id(running):
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
    card = client.models.retrieve("lora")
    assert card.id == "lora" and card.model_extra["parent"] == "base"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_engine_score_equals_log_softmax(ref):
    texts = ["the quick brown fox", "SELECT name"]
    scores = ref.score(texts, adapters=["lora", ak.Mix({"prompt": 1.0})], top=2)
    for text, entry, got in zip(texts, ["lora", ak.Mix({"prompt": 1.0})], scores):
        ids = ref.encode([text])[0]
        logprobs = torch.log_softmax(ref.logits(torch.tensor([ids]), adapters=[entry])[0].float(), -1)
        expected = [None] + [float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids))]
        assert got.token_ids == ids and got.logprobs[0] is None
        torch.testing.assert_close(torch.tensor(got.logprobs[1:]), torch.tensor(expected[1:]), atol=1e-6, rtol=0)
        assert [i for i, _ in got.top[1]] == logprobs[0].topk(2).indices.tolist()


def test_lm_evaluation_harness_runs_against_the_server(tiny_llama, running, ref, tmp_path, monkeypatch):
    """lm-evaluation-harness' ``local-completions`` model on two tiny local tasks: the multiple-choice
    task's per-choice loglikelihoods equal the engine's own scoring of the same tokens (1e-4: sums of
    up to a dozen logprobs), and the generation task completes with the engine's greedy text."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the test extra lm_eval[api]")
    from lm_eval.tasks import TaskManager

    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    rows = [{"question": f"Q{i}: the quick", "choices": [" brown", " red", " fox"], "answer": i % 3} for i in range(4)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps({"question": f"Say {i}:", "answer": "x"}) + "\n"
                                                for i in range(3)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"{{answer}}\"\n"
    (tasks / "mc.yaml").write_text(
        f"task: adaptkit_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\nmetric_list:\n  - metric: acc\n")
    (tasks / "gen.yaml").write_text(
        f"task: adaptkit_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'gen.jsonl'}\n"
        "output_type: generate_until\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 5\n"
        "metric_list:\n  - metric: exact_match\n")
    model_args = (f"model=lora,base_url={running.url}/v1/completions,tokenizer={tiny_llama},"
                  "tokenizer_backend=huggingface,num_concurrent=2,max_retries=1")
    out = lm_eval.simple_evaluate(model="local-completions", model_args=model_args,
                                  tasks=["adaptkit_mc", "adaptkit_gen"], task_manager=TaskManager(include_path=str(tasks)),
                                  log_samples=True)
    assert out["results"]["adaptkit_mc"]["sample_len"] == 4 and "acc,none" in out["results"]["adaptkit_mc"]
    tokenizer = ref.tokenizer
    for sample in out["samples"]["adaptkit_mc"]:
        for (context, continuation), [(loglikelihood, _)] in zip(sample["arguments"], sample["resps"]):
            context_ids = tokenizer.encode(context, add_special_tokens=False)
            whole = tokenizer.encode(context + continuation, add_special_tokens=False)
            expected = sum(ref.score([whole], adapters="lora")[0].logprobs[len(context_ids):])
            assert abs(loglikelihood - expected) < 1e-4
    for sample in out["samples"]["adaptkit_gen"]:
        prompt = tokenizer.encode(sample["arguments"][0][0], add_special_tokens=False)
        greedy = ref.generate_ids([prompt], ["lora"], max_new_tokens=5)[0]
        assert sample["resps"][0][0] == tokenizer.decode(greedy, skip_special_tokens=True).split("\n")[0]
