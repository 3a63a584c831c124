"""``adaptkit generate``: text from a base and its adapters, streamed or as JSON."""

from __future__ import annotations

import click

from adaptkit.cli.options import _named_paths, device_option, dtype_option


@click.command()
@click.argument("base", type=click.Path())
@click.option("--adapter", "adapter_specs", multiple=True, help="NAME=PATH of an adapter to load (repeatable).")
@click.option("--use", "use", default=None, help="Adapter to generate with (default: the first --adapter; 'base' for none).")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt text (repeatable: one batch).")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--top-k", default=0, show_default=True)
@click.option("--seed", default=None, type=int)
@dtype_option
@device_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per prompt (prompt, text, tokens), for scripts.")
@click.option("--chat", is_flag=True, help="Each prompt is a user message, sent through the tokenizer's chat template "
              "(only the reply is printed).")
def generate(base, adapter_specs, use, prompts, max_new_tokens, temperature, top_p, top_k, seed, dtype, device,
             as_json, chat):
    """Generate from BASE with an adapter; one prompt's text streams as it is generated."""
    import json

    import adaptkit as ak

    engine = ak.Engine.from_pretrained(base, dtype=dtype, device=device)
    pairs = _named_paths(adapter_specs)
    for name, path in pairs:
        engine.add_adapter(name, path)
    if use == "base":
        use = None
    elif use is None and pairs:
        use = pairs[0][0]
    shown = [""] * len(prompts) if chat else list(prompts)  # what is echoed before the generated text
    if chat:
        from adaptkit.chat import chat_prompt_ids

        prompt_ids = [chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    else:
        prompt_ids = engine.encode(list(prompts))
    stream = len(prompts) == 1 and not as_json
    tokens: list[int] = []
    printed = 0

    def show(row, token):  # print what the tokens so far add to the text, whole characters only
        nonlocal printed
        if not tokens:
            click.echo(shown[0], nl=False)  # once generation has started (bad requests fail before)
        tokens.append(token)
        text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            click.echo(text[printed:], nl=False)
            printed = len(text)

    outputs = engine.generate_ids(prompt_ids, [use] * len(prompts), max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                  on_token=show if stream else None)
    texts = [engine.tokenizer.decode(t, skip_special_tokens=True) for t in outputs]
    if stream:
        click.echo(("" if tokens else shown[0]) + texts[0][printed:])
        return
    for prompt, echo, text, new in zip(prompts, shown, texts, outputs):
        click.echo(json.dumps({"prompt": prompt, "text": text, "tokens": new}) if as_json else f"{echo}{text}")
