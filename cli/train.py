"""``adaptkit train``: train an adapter of any method and write it in its kind's layout."""

from __future__ import annotations

import click

from adaptkit.cli.options import quiet_option


def _verbalizer(value: str | None) -> dict | None:
    """``--verbalizer``: a JSON object ``{"pos": "great"}`` or ``pos=great,neg=bad``."""
    import json

    from adaptkit.errors import InvalidArgumentError

    if value is None:
        return None
    if value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"--verbalizer {value!r}: not valid JSON ({exc.msg})") from exc
        if not isinstance(parsed, dict):
            raise InvalidArgumentError(f"--verbalizer {value!r}: expected a JSON object of label -> word")
        return parsed
    pairs = [item.partition("=") for item in value.split(",") if item.strip()]
    if not pairs or any(not sep or not label.strip() for label, sep, _ in pairs):
        raise InvalidArgumentError(f"--verbalizer {value!r}: expected label=word,label=word or a JSON object")
    return {label.strip(): word.strip() for label, _, word in pairs}


# CLI option -> ak.train method option (passed only when given)
_TRAIN_METHOD_OPTIONS = {
    "rank": "r", "alpha": "alpha", "targets": "targets", "rslora": "rslora", "virtual_tokens": "virtual_tokens",
    "encoder": "encoder", "encoder_hidden": "encoder_hidden", "prompt_init": "init", "prompt_init_text": "init_text",
    "pretrain_data": "pretrain_data", "pretrain_epochs": "pretrain_epochs", "architecture": "architecture",
    "reduction_factor": "reduction_factor", "fuse": "adapters", "pet_train": "train",
}


@click.command()
@click.option("--method", required=True, help="lora, qlora, prefix, ptuning2, prompt, ptuning, ppt, bottleneck, fusion, pet.")
@click.option("--base", required=True, type=click.Path(), help="Base model folder.")
@click.option("--data", required=True, type=click.Path(), help='jsonl: {"text"}, {"prompt","completion"} or {"text","label"} rows.')
@click.option("-o", "--out", required=True, type=click.Path(), help="Output adapter folder.")
@click.option("--epochs", default=1, show_default=True)
@click.option("--lr", default=None, type=float, help="AdamW learning rate (default: the method's).")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--grad-accum", default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--eval-split", default=0.1, show_default=True, help="Share of rows held out for evaluation.")
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", default=None, type=click.Path(), help="Checkpoint folder (or OUT.checkpoints) to continue from.")
@click.option("--max-steps", default=None, type=int, help="Stop after this many optimizer steps.")
@click.option("--save-every", default=None, type=int, help="Checkpoint every N steps (always after each epoch).")
@click.option("--checkpoint-dir", default=None, type=click.Path(), help="Where checkpoints go (default OUT.checkpoints).")
@click.option("--max-length", default=512, show_default=True, help="Longest row in tokens.")
@click.option("--weight-decay", default=0.0, show_default=True)
@click.option("--pattern", default=None, help='Classification: pattern with {text} and one {mask}, e.g. "{text} It was {mask}."')
@click.option("--verbalizer", default=None, help='Classification: label=word,... or a JSON object (default: label itself).')
@click.option("--dtype", default="float32", show_default=True,
              help="Base dtype: float32, bfloat16, float16 or auto (the checkpoint's); the compute dtype for qlora.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--rank", default=None, type=int, help="lora/qlora/pet: LoRA rank (default 8).")
@click.option("--alpha", default=None, type=float, help="lora/qlora/pet: LoRA alpha (default 16).")
@click.option("--targets", default=None, help="lora/qlora/pet: comma-separated module names (default per architecture).")
@click.option("--rslora", is_flag=True, default=None, help="lora/qlora/pet: scale alpha/sqrt(r).")
@click.option("--virtual-tokens", default=None, type=int, help="prefix/ptuning2/prompt/ptuning/ppt: virtual tokens (default 8).")
@click.option("--encoder", type=click.Choice(["mlp", "lstm"]), default=None, help="ptuning: prompt encoder (default mlp).")
@click.option("--encoder-hidden", default=None, type=int, help="prefix/ptuning: encoder hidden size.")
@click.option("--prompt-init", type=click.Choice(["random", "vocab", "text"]), default=None, help="prompt/ppt: initialisation.")
@click.option("--prompt-init-text", default=None, help="prompt/ppt with --prompt-init text: the text.")
@click.option("--pretrain-data", default=None, type=click.Path(), help='ppt: unlabeled {"text"} jsonl to pre-train the prompt on.')
@click.option("--pretrain-epochs", default=None, type=int, help="ppt: epochs of pre-training (default 1).")
@click.option("--architecture", type=click.Choice(["houlsby", "pfeiffer", "parallel"]), default=None,
              help="bottleneck: adapter placement (default pfeiffer).")
@click.option("--reduction-factor", default=None, type=float, help="bottleneck: hidden / bottleneck size.")
@click.option("--fuse", default=None, help="fusion: the trained bottleneck adapters, name=path,name=path.")
@click.option("--pet-train", type=click.Choice(["lora", "full"]), default=None, help="pet: fine-tune a LoRA (default) or every weight.")
@click.option("--task", type=click.Choice(["seq-cls", "token-cls", "seq2seq"]), default=None,
              help="seq-cls / token-cls: train BASE's classification head with the adapter (PEFT SEQ_CLS / TOKEN_CLS; "
              "rows {text, label} or {tokens, labels}); seq2seq: {prompt, completion} rows on T5 / BART (the default there).")
@click.option("--force", is_flag=True, help="Replace OUT (and its old checkpoints) if they exist.")
@quiet_option
def train(method, base, data, out, epochs, lr, batch_size, grad_accum, eval_split, seed, resume, max_steps, save_every,
          checkpoint_dir, max_length, weight_decay, pattern, verbalizer, dtype, device, task, force, quiet, **method_cli):
    """Train an adapter of --method on BASE with --data; write it to OUT in its kind's layout.

    \b
    adaptkit train --method lora --base BASE --data train.jsonl -o adapters/sql --epochs 3 --rank 16
    adaptkit train --method pet --base BASE --data reviews.jsonl -o adapters/sentiment \\
        --pattern "{text} It was {mask}." --verbalizer pos=great,neg=bad
    """
    import adaptkit as ak

    options = {_TRAIN_METHOD_OPTIONS[k]: v for k, v in method_cli.items() if v is not None}
    if "targets" in options:
        options["targets"] = [t.strip() for t in options["targets"].split(",") if t.strip()]
    result = ak.train(method, base, data, out, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                      eval_split=eval_split, seed=seed, resume=resume, max_steps=max_steps, save_every=save_every,
                      checkpoint_dir=checkpoint_dir, max_length=max_length, weight_decay=weight_decay, pattern=pattern,
                      verbalizer=_verbalizer(verbalizer), dtype=dtype, device=device, progress=not quiet, force=force,
                      task=task, **options)
    click.echo(f"wrote {result.path} ({method}, {result.steps} steps, {result.tokens / max(result.seconds, 1e-9):.0f} tokens/s)")
    if result.losses:
        click.echo(f"training loss: first step {result.losses[0]:.4f}, last step {result.losses[-1]:.4f}")
    if result.final_eval:
        ev = result.final_eval
        click.echo(f"eval ({ev['count']} predictions): loss {ev['loss']:.4f}, accuracy {ev['accuracy']:.3f} "
                   f"(chance {ev['chance']:.3g})")
    click.echo(f"checkpoint {result.checkpoint}")
