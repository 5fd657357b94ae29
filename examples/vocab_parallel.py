"""A vocabulary-parallel LM head with dropreg: each rank holds a slice of the head's rows.

    torchrun --nproc-per-node 2 examples/vocab_parallel.py

Uses NCCL when CUDA is available, gloo on CPU otherwise. Every rank builds the same full head from one seed
(in a real model each rank would own only its slice), takes its slice, and computes the loss with
``process_group``; rank 0 then checks the loss and the gradients against one process holding the whole head.
"""
import os

import torch
import torch.distributed as dist

import dropreg


def main():
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)

    gen = torch.Generator().manual_seed(0)
    rows, dim, vocab = 64, 32, 1000
    hidden = torch.randn(rows, dim, generator=gen).to(device)            # the same on every rank
    head = (torch.randn(vocab, dim, generator=gen) / dim**0.5).to(device)
    labels = torch.randint(0, vocab, (rows,), generator=gen).to(device)  # global class indices
    labels[:3] = -100                                                     # ignored rows

    # This rank's contiguous slice; slices are in rank order and may differ in size.
    head_slice = torch.tensor_split(head, world)[rank].clone().requires_grad_()
    hidden = hidden.clone().requires_grad_()
    out = dropreg.linear_cross_entropy(hidden, head_slice, labels, p=0.1, seed=1234, process_group=dist.group.WORLD)
    out.loss.backward()  # hidden.grad: the full gradient; head_slice.grad: this slice's

    if rank == 0:
        full_hidden, full_head = hidden.detach().clone().requires_grad_(), head.clone().requires_grad_()
        ref = dropreg.linear_cross_entropy(full_hidden, full_head, labels, p=0.1, seed=1234)
        ref.loss.backward()
        assert torch.allclose(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
        assert torch.allclose(hidden.grad, full_hidden.grad, rtol=1e-4, atol=1e-6)
        assert torch.allclose(head_slice.grad, torch.tensor_split(full_head.grad, world)[0], rtol=1e-4, atol=1e-6)
        print(f"world {world}: loss {out.loss.item():.6f} (ce {out.ce.item():.6f}) matches one process")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
