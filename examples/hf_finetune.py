"""Train a Hugging Face causal LM with dropreg's fused loss through `transformers.Trainer`: one class swapped.

    python examples/prepare_fortunes.py --out data/fortunes        # the corpus (see that script)
    python examples/hf_finetune.py --data data/fortunes --out docs/hf_finetune

Two arms on the same model, data, seed and steps: `transformers.Trainer` with the model's own loss (which builds the
N x V logits), and `dropreg.hf.DropregTrainer` with dropout's explicit and implicit terms at the head (p=0.1) and a
z-loss, never building the logits. Both report the evaluation cross entropy of the validation split; DropregTrainer
computes only the cross entropy in eval mode, so the two evaluation losses mean the same thing.

`--model PATH` fine-tunes a local checkpoint (`AutoModelForCausalLM.from_pretrained(PATH)`; the corpus's word ids are
then taken modulo its vocabulary, so bring a tokenized corpus for real use). Without it, a small Llama is built from a
config with the corpus's vocabulary and trained from its random initialization: this machine cannot download weights.
Writes `log.csv` (every logged step of both arms) and `summary.md` under --out.
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


def build_model(args, vocab_size):
    torch.manual_seed(args.seed)
    if args.model:
        return transformers.AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=args.length, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


class LossLog(transformers.TrainerCallback):
    def __init__(self, arm):
        self.arm, self.rows = arm, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        for key in ("loss", "eval_loss"):
            if key in logs:
                self.rows.append(dict(arm=self.arm, step=state.global_step, metric=key, value=float(logs[key])))


def run_arm(arm, args, vocab, train, valid):
    model = build_model(args, len(vocab))
    if args.model:
        for example in train + valid:
            for key in ("input_ids", "labels"):
                example[key] = example[key] % model.config.vocab_size
    training = transformers.TrainingArguments(
        output_dir=os.path.join(args.out, "trainer", arm), max_steps=args.steps, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=20,
        weight_decay=0.0, logging_steps=args.log_every, eval_strategy="steps", eval_steps=args.eval_every,
        save_strategy="no", report_to=[], use_cpu=True, seed=args.seed, data_seed=args.seed,
        dataloader_num_workers=0, disable_tqdm=True)
    log = LossLog(arm)
    common = dict(model=model, args=training, train_dataset=train, eval_dataset=valid, callbacks=[log])
    if arm == "hf":
        trainer = transformers.Trainer(**common)
    else:
        trainer = hf.DropregTrainer(**common, p=args.p, z_loss=args.z_loss)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    final = trainer.evaluate()
    log.rows.append(dict(arm=arm, step=args.steps, metric="final_eval_loss", value=float(final["eval_loss"])))
    return log.rows, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/fortunes")
    parser.add_argument("--out", default="docs/hf_finetune")
    parser.add_argument("--model", default=None, help="a local checkpoint to fine-tune instead of a fresh Llama")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--z-loss", type=float, default=1e-4)
    parser.add_argument("--train-blocks", type=int, default=None, help="use the first N training blocks only")
    parser.add_argument("--valid-blocks", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.data, "vocab.txt"), encoding="utf-8") as f:
        vocab = [line.strip() for line in f if line.strip()]
    for special in ("<unk>", "<eos>"):
        if special not in vocab:
            vocab.append(special)
    train = blocks(read_split(args.data, "train", vocab), args.length, args.train_blocks)
    valid = blocks(read_split(args.data, "valid", vocab), args.length, args.valid_blocks)
    print(f"{len(train)} training and {len(valid)} validation blocks of {args.length} tokens, V={len(vocab)}",
          flush=True)

    rows, seconds = [], {}
    for arm in ("hf", "dropreg"):
        arm_rows, seconds[arm] = run_arm(arm, args, vocab, [dict(e) for e in train], [dict(e) for e in valid])
        rows += arm_rows
        print(f"{arm}: {seconds[arm]:.1f} s, final eval loss {arm_rows[-1]['value']:.4f}", flush=True)

    with open(os.path.join(args.out, "log.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["arm", "step", "metric", "value"])
        writer.writeheader()
        writer.writerows(rows)
    evals = {}
    for arm in seconds:  # the final evaluate() logs an eval_loss at the last step again: keep one per step
        by_step = {}
        for r in rows:
            if r["arm"] == arm and r["metric"] == "eval_loss":
                by_step.setdefault(r["step"], r)
        evals[arm] = list(by_step.values())
    finals = {arm: next(r["value"] for r in rows if r["arm"] == arm and r["metric"] == "final_eval_loss")
              for arm in seconds}
    lines = [
        "# DropregTrainer against transformers.Trainer",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        f"({'checkpoint ' + args.model if args.model else f'Llama {args.layers}x{args.hidden} from its config'}, "
        f"V={len(vocab)}, {len(train)} blocks of {args.length} tokens, batch {args.batch}, lr {args.lr} cosine; "
        f"dropreg p={args.p}, z_loss={args.z_loss}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, dropreg {dropreg.__version__}, {platform.machine()} "
        f"{os.cpu_count()} CPUs).",
        "",
        "| step | " + " | ".join(f"{arm} eval loss" for arm in seconds) + " |",
        "|---:|" + "---:|" * len(seconds),
    ]
    for i, row in enumerate(evals["hf"]):
        lines.append(f"| {row['step']} | " + " | ".join(f"{evals[arm][i]['value']:.4f}" for arm in seconds) + " |")
    lines += ["", "| arm | final eval loss | train seconds |", "|---|---:|---:|"]
    lines += [f"| {arm} | {finals[arm]:.4f} | {seconds[arm]:.1f} |" for arm in seconds]
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
