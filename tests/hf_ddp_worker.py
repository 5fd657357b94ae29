"""Worker processes for tests/test_hf.py's DistributedDataParallel tests (gloo, CPU): run with torch.multiprocessing."""
import os

import torch
import torch.distributed as dist


def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))


def rank_batch(rank):
    generator = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(3, 97, (2, 9), generator=generator)
    return ids, ids.clone()


def causal_lm_loss_worker(rank, world, port, out_dir):
    """Each rank: its own batch through causal_lm_loss(DDP(model)), both dropout terms on; saves the gradients."""
    import test_hf
    from dropreg import hf
    _init(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = test_hf.llama()
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        ids, labels = rank_batch(rank)
        out = hf.causal_lm_loss(wrapped, ids, labels, p=0.2, seed=7 + rank)
        out.loss.backward()
        torch.save({name: param.grad for name, param in model.named_parameters()},
                   os.path.join(out_dir, f"grads{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    _exit_without_teardown()


def trainer_loss(model, ids, labels, out_dir):
    """DropregTrainer's training loss of one batch (its compute_loss, both dropout terms on), as Trainer calls it."""
    import transformers

    from dropreg import hf
    args = transformers.TrainingArguments(output_dir=os.path.join(out_dir, "trainer"), use_cpu=True, report_to=[],
                                          save_strategy="no", disable_tqdm=True, seed=3)
    trainer = hf.DropregTrainer(model=model, args=args, p=0.2)
    model.train()
    return trainer.compute_loss(model, {"input_ids": ids, "labels": labels})


def fsdp2_worker(rank, world, port, out_dir):
    """Each rank: its own batch through causal_lm_loss on a model sharded with FSDP2 (fully_shard on every decoder
    layer and on the root), both dropout terms on, then through DropregTrainer's compute_loss; saves both losses and
    full gradients."""
    from torch.distributed.fsdp import fully_shard

    import test_hf
    from dropreg import hf
    _init(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = test_hf.llama()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        ids, labels = rank_batch(rank)
        saved = {}
        for name, step in (("causal_lm_loss", lambda: hf.causal_lm_loss(model, ids, labels, p=0.2, seed=7 + rank).loss),
                           ("trainer", lambda: trainer_loss(model, ids, labels, out_dir))):
            model.zero_grad()
            loss = step()
            loss.backward()
            saved[name] = dict(loss=loss.detach(),
                               grads={n: param.grad.full_tensor() for n, param in model.named_parameters()})
        torch.save(saved, os.path.join(out_dir, f"fsdp{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    _exit_without_teardown()


def trainer_worker(rank, world, port, out_dir):
    """DropregTrainer under DDP (accelerate starts gloo from the environment): a few steps, then saves the weights."""
    import transformers

    import test_hf
    from dropreg import hf
    _init(rank, world, port)
    model = test_hf.llama(torch.float32)
    data = []
    generator = torch.Generator().manual_seed(5)
    for _ in range(8):
        ids = torch.randint(3, test_hf.V, (8,), generator=generator)
        data.append({"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": ids.clone()})
    args = transformers.TrainingArguments(output_dir=os.path.join(out_dir, f"run{rank}"), max_steps=3,
                                          per_device_train_batch_size=2, report_to=[], use_cpu=True,
                                          save_strategy="no", learning_rate=1e-2, ddp_backend="gloo",
                                          disable_tqdm=True, seed=3)
    trainer = hf.DropregTrainer(model=model, args=args, train_dataset=data, p=0.2)
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel), type(trainer.model_wrapped)
    torch.save({name: param.detach() for name, param in model.named_parameters()},
               os.path.join(out_dir, f"weights{rank}.pt"))
    _exit_without_teardown()


def _exit_without_teardown():
    """Ends a rank whose results are saved without Python's teardown. Seen once in CI (torch 2.13, gloo): the main
    thread, dropping DDP's reducer, destroyed the process group and joined gloo's worker thread while that thread
    waited for the GIL to release a finished all-gather's tensor: a deadlock that hung the test."""
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
