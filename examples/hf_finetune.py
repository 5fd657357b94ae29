"""Fine-tune a Hugging Face causal LM with dropreg's fused loss through `transformers.Trainer`: one class swapped.

    python examples/prepare_fortunes.py --out data/fortunes        # the corpus (see that script)
    python examples/hf_finetune.py --data data/fortunes --out docs/hf_finetune

The base model: `--model PATH` (any local `AutoModelForCausalLM` checkpoint; the corpus's word ids are then taken
modulo its vocabulary, so bring a tokenized corpus for real use). Without it, this machine cannot download weights,
so a small Llama is first pretrained here from its config with `transformers.Trainer` (`--pretrain-steps`) on the
training split less the fine-tuning subset, and saved under --out/base.

Then two fine-tuning arms start from that checkpoint, with the same small training subset (`--finetune-blocks`,
several epochs: the regime where regularization matters), seed and steps: `transformers.Trainer` with the model's own
loss (which builds the N x V logits), and `dropreg.hf.DropregTrainer` with dropout's explicit and implicit terms at
the head (`--p`) and a z-loss, never building the logits. Both report the validation cross entropy; DropregTrainer
computes only the cross entropy in eval mode, so the two evaluation losses mean the same thing. Writes `log.csv`
(every logged value of every stage) and `summary.md` under --out.
"""
import argparse
import csv
import os
import platform
import sys
import time

import torch
import transformers

import dropreg
from dropreg import hf


def read_split(folder, split, vocab):
    index = {word: i for i, word in enumerate(vocab)}
    unk = index["<unk>"]
    ids = []
    with open(os.path.join(folder, f"{split}.txt"), encoding="utf-8") as f:
        for line in f:
            ids += [index.get(word, unk) for word in line.split()] + [index["<eos>"]]
    return torch.tensor(ids)


def blocks(ids, length, limit=None):
    """Non-overlapping ``length``-token training examples (labels = inputs: the model shifts them)."""
    usable = (ids.numel() // length) * length
    chunks = ids[:usable].view(-1, length)
    if limit is not None:
        chunks = chunks[:limit]
    return [{"input_ids": c, "attention_mask": torch.ones_like(c), "labels": c.clone()} for c in chunks]


def fresh_llama(args, vocab_size):
    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=args.length, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


class LossLog(transformers.TrainerCallback):
    def __init__(self, arm):
        self.arm, self.rows = arm, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        for key in ("loss", "eval_loss"):
            if key in logs:
                self.rows.append(dict(arm=self.arm, step=state.global_step, metric=key, value=float(logs[key])))


def train(arm, model, args, train_set, valid_set, steps, lr):
    training = transformers.TrainingArguments(
        output_dir=os.path.join(args.out, "trainer", arm), max_steps=steps, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch, learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=20,
        weight_decay=0.0, logging_steps=args.log_every, eval_strategy="steps", eval_steps=args.eval_every,
        save_strategy="no", report_to=[], use_cpu=True, seed=args.seed, data_seed=args.seed,
        dataloader_num_workers=0, disable_tqdm=True)
    log = LossLog(arm)
    common = dict(model=model, args=training, train_dataset=train_set, eval_dataset=valid_set, callbacks=[log])
    if arm == "dropreg":
        trainer = hf.DropregTrainer(**common, p=args.p, z_loss=args.z_loss)
    else:
        trainer = transformers.Trainer(**common)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    final = trainer.evaluate()
    log.rows.append(dict(arm=arm, step=steps, metric="final_eval_loss", value=float(final["eval_loss"])))
    return log.rows, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/fortunes")
    parser.add_argument("--out", default="docs/hf_finetune")
    parser.add_argument("--model", default=None, help="a local checkpoint to fine-tune (else one is pretrained here)")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per arm")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    parser.add_argument("--finetune-blocks", type=int, default=256, help="the fine-tuning subset, in blocks")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--p", type=float, default=0.3)
    parser.add_argument("--z-loss", type=float, default=1e-4)
    parser.add_argument("--valid-blocks", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.data, "vocab.txt"), encoding="utf-8") as f:
        vocab = [line.strip() for line in f if line.strip()]
    for special in ("<unk>", "<eos>"):
        if special not in vocab:
            vocab.append(special)
    train_all = blocks(read_split(args.data, "train", vocab), args.length)
    valid = blocks(read_split(args.data, "valid", vocab), args.length, args.valid_blocks)
    # the fine-tuning subset: the last blocks of the training split, which pretraining does not see
    finetune, pretrain_set = train_all[-args.finetune_blocks:], train_all[:-args.finetune_blocks]
    print(f"{len(train_all)} training blocks ({len(finetune)} for fine-tuning), {len(valid)} validation blocks of "
          f"{args.length} tokens, V={len(vocab)}", flush=True)

    rows, seconds = [], {}
    base = args.model
    if base is None:
        base = os.path.join(args.out, "base")
        model = fresh_llama(args, len(vocab))
        stage_rows, seconds["pretrain"] = train("pretrain", model, args, pretrain_set, valid, args.pretrain_steps,
                                                args.pretrain_lr)
        rows += stage_rows
        model.save_pretrained(base)
        print(f"pretrained: {seconds['pretrain']:.1f} s, eval loss {stage_rows[-1]['value']:.4f}", flush=True)
    arms = ("hf", "dropreg")
    for arm in arms:
        model = load(base)
        data = [dict(e) for e in finetune]
        if args.model:
            for example in data + valid:
                for key in ("input_ids", "labels"):
                    example[key] = example[key] % model.config.vocab_size
        arm_rows, seconds[arm] = train(arm, model, args, data, [dict(e) for e in valid], args.steps, args.lr)
        rows += arm_rows
        print(f"{arm}: {seconds[arm]:.1f} s, final eval loss {arm_rows[-1]['value']:.4f}", flush=True)

    with open(os.path.join(args.out, "log.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["arm", "step", "metric", "value"])
        writer.writeheader()
        writer.writerows(rows)
    evals = {}
    for arm in arms:  # the final evaluate() logs an eval_loss at the last step again: keep one per step
        by_step = {}
        for r in rows:
            if r["arm"] == arm and r["metric"] == "eval_loss":
                by_step.setdefault(r["step"], r)
        evals[arm] = list(by_step.values())
    finals = {stage: next(r["value"] for r in rows if r["arm"] == stage and r["metric"] == "final_eval_loss")
              for stage in seconds}
    base_text = (f"checkpoint {args.model}" if args.model else
                 f"Llama {args.layers}x{args.hidden} pretrained here for {args.pretrain_steps} steps (lr "
                 f"{args.pretrain_lr}) on the other {len(pretrain_set)} training blocks")
    lines = [
        "# Fine-tuning with DropregTrainer against transformers.Trainer",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"Base: {base_text}. Fine-tuning: {len(finetune)} blocks of {args.length} tokens, {args.steps} steps of "
        f"batch {args.batch} (about {args.steps * args.batch / len(finetune):.0f} epochs), lr {args.lr} cosine; "
        f"dropreg p={args.p} (explicit and implicit terms at the head), z_loss={args.z_loss}. V={len(vocab)}, "
        f"{len(valid)} validation blocks. torch {torch.__version__}, transformers {transformers.__version__}, dropreg "
        f"{dropreg.__version__}, {platform.machine()}, {os.cpu_count()} CPUs.",
        "",
        "Validation cross entropy during fine-tuning:",
        "",
        "| step | " + " | ".join(f"{arm} eval loss" for arm in arms) + " |",
        "|---:|" + "---:|" * len(arms),
    ]
    for i, row in enumerate(evals[arms[0]]):
        lines.append(f"| {row['step']} | " + " | ".join(f"{evals[arm][i]['value']:.4f}" for arm in arms) + " |")
    lines += ["", "| stage | final eval loss | train seconds |", "|---|---:|---:|"]
    lines += [f"| {stage} | {finals[stage]:.4f} | {seconds[stage]:.1f} |" for stage in seconds]
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
