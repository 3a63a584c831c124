"""Encoder-decoders: the encoder runs once on the prompts (each row with its adapter: prompt rows' virtual
tokens in front of the encoder's input, prefix rows' K/V in the decoder's cache), then the decoder steps
one token per row (``Engine.start_seq2seq``; the server's waves decode with it)."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from adaptkit import prefix_cache
from adaptkit.measured import cache_argument
from adaptkit.routing import use_plan


def start(engine, prompt_ids, adapters, pad_id: int):
    """See :meth:`Engine.start_seq2seq` (the engine's lock held, under inference mode)."""
    from transformers import EncoderDecoderCache

    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long, device=engine.device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompt_ids):
        ids[row, : len(prompt)], mask[row, : len(prompt)] = torch.tensor(list(prompt), device=engine.device), 1
    plan = engine.plan(adapters, len(prompt_ids))
    start = engine.model.config.decoder_start_token_id
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :0]}
    prefix_cache.add_virtual_inputs(engine.model, plan, engine._adapters, inputs, engine.prompt_as_cache)
    mask = inputs["attention_mask"]  # prompt rows: their virtual tokens in front of the encoder's input
    cache_kw = cache_argument(engine.model)
    cache = inputs.pop(cache_kw, cache)  # prefix rows: their K/V in the decoder's cache
    decoder_mask = inputs.get("decoder_attention_mask")
    with use_plan(plan):
        encoded = engine.model.get_encoder()(input_ids=inputs.get("input_ids"), attention_mask=mask,
                                           inputs_embeds=inputs.get("inputs_embeds"))

    def step(tokens: torch.Tensor) -> torch.Tensor:
        nonlocal decoder_mask
        extra = {}
        if decoder_mask is not None:
            decoder_mask = torch.cat([decoder_mask, decoder_mask.new_ones(decoder_mask.shape[0], 1)], dim=1)
            extra["decoder_attention_mask"] = decoder_mask
        with torch.inference_mode(), use_plan(plan):
            out = engine.model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=tokens.view(-1, 1),
                             use_cache=True, **{cache_kw: cache}, **extra)
        return out.logits[:, -1, :]

    return step(torch.full((len(prompt_ids),), start, device=engine.device)), step
