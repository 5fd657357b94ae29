"""dropreg.hf against Hugging Face's own causal-LM loss on tiny random models built from configs."""
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
import dropreg  # noqa: E402
from dropreg import hf  # noqa: E402

V = 97
OFF = dict(explicit=False, implicit=False)


def llama(dtype=torch.float64, **extra):
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype)


def gpt2(dtype=torch.float64):
    # dropout off: HF's forward and ours must see the same network
    config = transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(dtype)


def granite(dtype=torch.float64):
    config = transformers.GraniteConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                        logits_scaling=4.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.GraniteForCausalLM(config).to(dtype)


def gemma2(dtype=torch.float64):
    # final_logit_softcapping 0.2: the random model's logits reach about 0.25, so the cap bends them
    config = transformers.Gemma2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                       max_position_embeddings=32, final_logit_softcapping=0.2, bos_token_id=1,
                                       eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.Gemma2ForCausalLM(config).to(dtype)


def cohere(dtype=torch.float64):
    # logit_scale 0.25 (Cohere multiplies the logits by it; its default is 0.0625)
    config = transformers.CohereConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                       logit_scale=0.25, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.CohereForCausalLM(config).to(dtype)


MODELS = {"llama": llama, "gpt2": gpt2, "granite": granite, "cohere": cohere}


def batch():
    torch.manual_seed(1)
    ids = torch.randint(3, V, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 4] = -100
    return ids, mask, labels


def hf_loss_float64(model, ids, mask, labels, num_items_in_batch=None):
    # HF's ForCausalLMLoss steps on HF's own logits, without its .float() (which would round float64 to float32)
    logits = model(ids, attention_mask=mask).logits
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.reshape(-1, V), shifted.reshape(-1), ignore_index=-100, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def assert_grads_close(ours, theirs, rtol, atol):
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("num_items", [None, 11])
def test_float64_matches_hf_loss_and_gradients(name, num_items):
    model = MODELS[name]()
    ids, mask, labels = batch()
    out = hf.causal_lm_loss(model, ids, labels, attention_mask=mask, num_items_in_batch=num_items, **OFF)
    ours = grads(model, out.loss)
    reference = hf_loss_float64(model, ids, mask, labels, num_items)
    theirs = grads(model, reference)
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, reference, rtol=1e-10, atol=0)
    assert_grads_close(ours, theirs, rtol=1e-10, atol=1e-13)
    # HF's real path computes the loss in float32: agreement to float32 rounding
    hf_loss = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=num_items).loss
    torch.testing.assert_close(out.loss.float(), hf_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_float32_matches_hf_loss_and_gradients(name):
    model = MODELS[name](torch.float32)
    ids, mask, labels = batch()
    out = hf.causal_lm_loss(model, ids, labels, attention_mask=mask, **OFF)
    ours = grads(model, out.loss)
    reference = model(ids, attention_mask=mask, labels=labels).loss
    theirs = grads(model, reference)
    # float32 rounding only: a different summation order over a loss of size ~4.6 and O(1) gradients
    # (Granite also folds the scale into the hidden states); 1e-5 is ~100 ulp
    torch.testing.assert_close(out.loss, reference, rtol=1e-5, atol=1e-6)
    assert_grads_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_autocast_bf16_training_step():
    """An fp32 model under bf16 autocast, as Trainer(bf16=True) runs it: the bf16 hidden states meet the fp32 head,
    which dropreg casts as F.linear would. The fp32 loss matches HF's own under the same autocast to bf16 accuracy
    (HF's logits are bf16-rounded, ours are accumulated in fp32), and every parameter gets a finite fp32 gradient."""
    model = llama(torch.float32)
    ids, mask, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hf.causal_lm_loss(model, ids, labels, attention_mask=mask, p=0.1, seed=0)
        ce_only = hf.causal_lm_loss(model, ids, labels, attention_mask=mask, **OFF)
        reference = model(ids, attention_mask=mask, labels=labels).loss
    assert out.loss.dtype == ce_only.loss.dtype == torch.float32
    torch.testing.assert_close(ce_only.loss, reference.float(), rtol=2e-2, atol=0)
    ours = grads(model, out.loss)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in ours.values())


def test_num_items_in_batch_tensor_and_shift_labels():
    model = llama()
    ids, mask, labels = batch()
    count = (labels[..., 1:] != -100).sum()
    summed = hf.causal_lm_loss(model, ids, labels, attention_mask=mask, num_items_in_batch=count, **OFF)
    mean = hf.causal_lm_loss(model, ids, labels, attention_mask=mask, **OFF)
    torch.testing.assert_close(summed.loss, mean.loss, rtol=1e-12, atol=0)
    shift = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()  # HF .view()s it
    given = hf.causal_lm_loss(model, ids, attention_mask=mask, shift_labels=shift, **OFF)
    torch.testing.assert_close(given.loss, mean.loss, rtol=1e-12, atol=0)
    reference = model(ids, attention_mask=mask, labels=labels, shift_labels=shift).loss
    torch.testing.assert_close(given.loss.float(), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "granite"])
def test_terms_on_equal_linear_cross_entropy_on_hf_hidden_states(name):
    model = MODELS[name]()
    ids, mask, labels = batch()
    out = hf.causal_lm_loss(model, ids, labels, attention_mask=mask, p=0.3, seed=5)
    hidden = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    scale = 1.0 / model.config.logits_scaling if name == "granite" else 1.0
    expected = dropreg.linear_cross_entropy(hidden[:, :-1] * scale, model.lm_head.weight, labels[:, 1:],
                                            p=0.3, seed=5)
    assert float(out.explicit.detach()) > 0 and float(out.implicit.detach()) != 0
    for ours, theirs in zip(out, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)


def right_padded_batch():
    # Gemma 2's eager attention gives NaN hidden states on a left-padded row in HF itself: pad on the right
    ids, mask, labels = batch()
    mask = torch.ones_like(mask)
    mask[1, -3:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100).masked_fill(labels == -100, -100)


@pytest.mark.parametrize("num_items", [None, 11])
def test_softcapped_model_matches_hf_loss_and_gradients(num_items):
    """Gemma 2's final_logit_softcapping goes to linear_cross_entropy(softcap=): loss and every parameter
    gradient equal HF's own, on HF's capped logits."""
    model = gemma2()
    ids, mask, labels = right_padded_batch()
    out = hf.causal_lm_loss(model, ids, labels, attention_mask=mask, num_items_in_batch=num_items, **OFF)
    ours = grads(model, out.loss)
    reference = hf_loss_float64(model, ids, mask, labels, num_items)
    theirs = grads(model, reference)
    torch.testing.assert_close(out.loss, reference, rtol=1e-10, atol=1e-12)
    assert_grads_close(ours, theirs, rtol=1e-8, atol=1e-12)
    uncapped = F.cross_entropy(model.lm_head(model.model(ids, attention_mask=mask).last_hidden_state)[:, :-1]
                               .reshape(-1, V), labels[:, 1:].reshape(-1), reduction="sum")
    assert abs(float(uncapped.detach()) - float(reference.detach()) * (num_items or 1)) > 1e-3  # the cap bends z


def test_softcapped_model_dropout_terms_are_the_capped_heads():
    model = gemma2()
    ids, mask, labels = right_padded_batch()
    out = hf.causal_lm_loss(model, ids, labels, attention_mask=mask, p=0.3, seed=5, z_loss=1e-2)
    hidden = model.model(ids, attention_mask=mask).last_hidden_state
    expected = dropreg.linear_cross_entropy(hidden[:, :-1], model.lm_head.weight, labels[:, 1:], p=0.3, seed=5,
                                            softcap=0.2, z_loss=1e-2)
    assert float(out.explicit.detach()) > 0 and float(out.z_loss.detach()) > 0
    for ours, theirs in zip(out, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)


def test_softcapped_model_with_label_smoothing_matches_f_cross_entropy_on_hf_logits():
    """Label smoothing on Gemma 2's capped head (docs/math.md 3.7): loss and every parameter gradient equal
    F.cross_entropy(label_smoothing=) on HF's own capped logits."""
    model = gemma2()
    ids, mask, labels = right_padded_batch()
    out = hf.causal_lm_loss(model, ids, labels, attention_mask=mask, label_smoothing=0.1, **OFF)
    ours = grads(model, out.loss)
    logits = model(ids, attention_mask=mask).logits[:, :-1]
    reference = F.cross_entropy(logits.reshape(-1, V), labels[:, 1:].reshape(-1), label_smoothing=0.1)
    theirs = grads(model, reference)
    torch.testing.assert_close(out.loss, reference, rtol=1e-10, atol=1e-12)
    assert_grads_close(ours, theirs, rtol=1e-8, atol=1e-12)


def test_z_loss_matches_its_definition_on_hf_logits():
    model = llama()
    ids, mask, labels = batch()
    out = hf.causal_lm_loss(model, ids, labels, attention_mask=mask, z_loss=1e-2, **OFF)
    logits = model(ids, attention_mask=mask).logits[:, :-1]
    kept = labels[:, 1:] != -100
    expected = 1e-2 * (torch.logsumexp(logits, -1)[kept] ** 2).mean()
    torch.testing.assert_close(out.z_loss, expected, rtol=1e-10, atol=1e-14)


class Headless(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Embedding(V, 16)
        self.lm_head = torch.nn.Linear(16, V)

    def get_output_embeddings(self):
        return self.lm_head


def test_missing_decoder_is_a_clear_error():
    ids, _, labels = batch()
    with pytest.raises(ValueError, match="pass decoder="):
        hf.causal_lm_loss(Headless(), ids, labels)
    # given explicitly, the decoder may be any module returning the hidden states (here with a head bias)
    model = Headless().double()
    out = hf.causal_lm_loss(model, ids, labels, decoder=lambda input_ids: (model.body(input_ids),), **OFF)
    logits = model.lm_head(model.body(ids))[:, :-1]
    torch.testing.assert_close(out.loss, F.cross_entropy(logits.reshape(-1, V), labels[:, 1:].reshape(-1)),
                               rtol=1e-12, atol=0)


class FakeLora(torch.nn.Module):
    def __init__(self, base, active):
        super().__init__()
        self.base_layer, self.active_adapters, self.merged, self.disable_adapters = base, active, False, False


def test_peft_head_unwrapped_only_when_trivial():
    model = llama()
    ids, mask, labels = batch()
    expected = hf.causal_lm_loss(model, ids, labels, **OFF)
    base = model.lm_head
    model.lm_head = FakeLora(base, [])
    torch.testing.assert_close(hf.causal_lm_loss(model, ids, labels, **OFF).loss, expected.loss)
    model.lm_head = FakeLora(base, ["default"])
    with pytest.raises(NotImplementedError, match="PEFT"):
        hf.causal_lm_loss(model, ids, labels)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_model_matches_hf_within_its_own_rounding(name):
    """A bf16 model (no autocast): the loss comes back in fp32, as HF's does, and the loss and every parameter
    gradient are as close to float64 (the same bf16 weights run in float64) as HF's own bf16 computation, plus a few
    bf16 roundings: ours keeps the head's products in fp32 where HF rounds the logits to bf16."""
    model = MODELS[name](torch.bfloat16)
    ids, mask, labels = batch()
    out = hf.causal_lm_loss(model, ids, labels, attention_mask=mask, **OFF)
    assert out.loss.dtype == torch.float32
    ours = grads(model, out.loss)
    theirs_loss = model(ids, attention_mask=mask, labels=labels).loss
    theirs = grads(model, theirs_loss)
    exact_model = MODELS[name](torch.float64)
    exact_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    exact_loss = hf_loss_float64(exact_model, ids, mask, labels)
    exact = grads(exact_model, exact_loss)
    eps = 2.0**-8
    assert abs(float(out.loss) - float(exact_loss)) <= abs(float(theirs_loss) - float(exact_loss)) + 4 * eps
    for key in exact:
        ours_err = float((ours[key].double() - exact[key]).abs().max())
        theirs_err = float((theirs[key].double() - exact[key]).abs().max())
        assert ours_err <= 2 * theirs_err + 4 * eps * float(exact[key].abs().max()), key


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_wrapped_model_all_reduces_the_gradients(tmp_path):
    """causal_lm_loss(DistributedDataParallel(model), ...) on 2 gloo ranks with different batches: every rank's
    gradients are the mean of the single-process gradients of the two batches (DDP's forward ran, so its
    all-reduce did; calling the inner decoder directly leaves each rank with its own)."""
    import torch.multiprocessing as mp

    import hf_ddp_worker
    mp.spawn(hf_ddp_worker.causal_lm_loss_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    expected = []
    for rank in range(2):
        model = llama()
        ids, labels = hf_ddp_worker.rank_batch(rank)
        expected.append(grads(model, hf.causal_lm_loss(model, ids, labels, p=0.2, seed=7 + rank).loss))
    mean = {name: (expected[0][name] + expected[1][name]) / 2 for name in expected[0]}
    for rank in range(2):
        assert_grads_close(torch.load(tmp_path / f"grads{rank}.pt"), mean, rtol=1e-10, atol=1e-13)


def test_fsdp2_sharded_model_gives_the_one_process_loss_and_mean_gradients(tmp_path):
    """causal_lm_loss and DropregTrainer's compute_loss on a model wrapped with FSDP2's fully_shard (2 gloo ranks,
    different batches): the loss runs inside the root module's call, so its parameters are gathered for the head and
    the gradients reduce-scattered: every rank's loss is the one-process loss of its batch and its gradients the mean
    over ranks."""
    import torch.multiprocessing as mp

    import hf_ddp_worker
    mp.spawn(hf_ddp_worker.fsdp2_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    steps = {"causal_lm_loss": lambda model, ids, labels, rank: hf.causal_lm_loss(model, ids, labels, p=0.2,
                                                                                  seed=7 + rank).loss,
             "trainer": lambda model, ids, labels, rank: hf_ddp_worker.trainer_loss(model, ids, labels,
                                                                                   str(tmp_path / "one"))}
    saved = [torch.load(tmp_path / f"fsdp{rank}.pt") for rank in range(2)]
    for name, step in steps.items():
        expected, losses = [], []
        for rank in range(2):
            model = llama()
            loss = step(model, *hf_ddp_worker.rank_batch(rank), rank)
            losses.append(loss.detach())
            expected.append(grads(model, loss))
        mean = {param: (expected[0][param] + expected[1][param]) / 2 for param in expected[0]}
        for rank in range(2):
            torch.testing.assert_close(saved[rank][name]["loss"], losses[rank], rtol=1e-12, atol=0, msg=name)
            assert_grads_close(saved[rank][name]["grads"], mean, rtol=1e-10, atol=1e-13)


@pytest.mark.slow
def test_trainer_under_ddp_keeps_the_replicas_equal(tmp_path):
    """DropregTrainer on 2 gloo ranks (accelerate's DDP): after a few steps on different shards of the data the two
    replicas hold the same weights, and they moved."""
    import torch.multiprocessing as mp

    import hf_ddp_worker
    mp.spawn(hf_ddp_worker.trainer_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    weights = [torch.load(tmp_path / f"weights{rank}.pt") for rank in range(2)]
    initial = dict(llama(torch.float32).named_parameters())
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(weights[0]["lm_head.weight"], initial["lm_head.weight"])


def _lora(model, targets, dropout=0.0):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout,
                             init_lora_weights=False)  # random B: the adapters change the loss
    return peft.get_peft_model(model, config).double()


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]], ids=["attention", "head"])
def test_peft_lora_matches_hf_loss_and_adapter_gradients(targets):
    """A real PEFT model: LoRA on attention (the head is the base layer) or on the LM head too (its weight is
    W + scaling B A, so the head's adapter trains through the fused loss). Loss and every trainable gradient equal
    HF's own loss on the PEFT model's logits."""
    model = _lora(llama(), targets)
    ids, mask, labels = batch()
    out = hf.causal_lm_loss(model, ids, labels, attention_mask=mask, **OFF)
    ours = grads(model, out.loss)
    reference = hf_loss_float64(model, ids, mask, labels)
    theirs = grads(model, reference)
    torch.testing.assert_close(out.loss, reference, rtol=1e-10, atol=1e-12)
    assert_grads_close(ours, theirs, rtol=1e-8, atol=1e-12)
    assert any("lora" in name for name in ours) and all("lora" in name for name in ours)
    if "lm_head" in targets:
        assert any("lm_head" in name for name in ours)


def test_peft_lora_head_with_dropout_is_refused_in_training():
    model = _lora(llama(), ["lm_head"], dropout=0.1)
    ids, mask, labels = batch()
    model.train()
    with pytest.raises(NotImplementedError, match="lora_dropout=0.1"):
        hf.causal_lm_loss(model, ids, labels)
    model.eval()  # dropout off: the adapter folds into the weight
    out = hf.causal_lm_loss(model, ids, labels, attention_mask=mask, **OFF)
    torch.testing.assert_close(out.loss, hf_loss_float64(model, ids, mask, labels), rtol=1e-10, atol=1e-12)


def test_trainer_steps(tmp_path):
    model = llama(torch.float32)
    torch.manual_seed(2)
    data = []
    for _ in range(6):
        ids = torch.randint(3, V, (8,))
        data.append({"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": ids.clone()})
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                          report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                                          learning_rate=1e-2)
    trainer = hf.DropregTrainer(model=model, args=args, train_dataset=data, p=0.2)
    seeds = []
    real_seed = trainer._dropreg_seed
    trainer._dropreg_seed = lambda: seeds.append(real_seed()) or seeds[-1]
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert len(set(seeds)) == 3
    changed = [name for name, param in model.named_parameters() if not torch.equal(param.detach(), before[name])]
    assert "lm_head.weight" in changed and len(changed) == len(before)


def test_label_smoothing_and_class_weights_match_f_cross_entropy():
    model = llama()
    ids, mask, labels = batch()
    class_weight = torch.rand(V, dtype=torch.float64) + 0.5
    out = hf.causal_lm_loss(model, ids, labels, attention_mask=mask, label_smoothing=0.1, weight=class_weight, **OFF)
    logits = model(ids, attention_mask=mask).logits
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    reference = F.cross_entropy(logits.reshape(-1, V), shifted.reshape(-1), weight=class_weight, label_smoothing=0.1)
    torch.testing.assert_close(out.loss, reference, rtol=1e-10, atol=1e-12)


def test_trainer_takes_label_smoothing_factor(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                          label_smoothing_factor=0.1)
    trainer = hf.DropregTrainer(model=llama(torch.float32), args=args, train_dataset=[], p=0.2)
    assert trainer.dropreg_options["label_smoothing"] == 0.1


def test_import_dropreg_needs_no_transformers():
    import subprocess
    import sys
    code = ("import sys; sys.modules['transformers'] = None; import dropreg, dropreg.hf; "
            "assert 'DropregTrainer' not in vars(dropreg.hf)")
    subprocess.run([sys.executable, "-c", code], check=True)


def gpt2_with_dropout(dtype=torch.float64, attn_pdrop=0.0):
    config = transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=32, resid_pdrop=0.2,
                                     embd_pdrop=0.1, attn_pdrop=attn_pdrop, bos_token_id=1, eos_token_id=2,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(dtype)


def test_every_dropout_of_a_gpt2_as_a_site_matches_the_authors_formulation():
    """sites='dropout' on a tiny GPT-2 in float64: its three nn.Dropout calls (embeddings, attention output, MLP
    output) become sites; against the authors' formulation (tests/test_sites.py) on HF's materialized logits with the
    same draws and signs, values and every parameter gradient."""
    from dropreg.signs import philox_signs
    from test_sites import authors_terms

    model = gpt2_with_dropout()
    model.train()
    ids, mask, labels = batch()
    seed, samples = 5, 2

    model.zero_grad()
    out = hf.causal_lm_loss(model, ids, labels, attention_mask=mask, p=0.0, sites="dropout", samples=samples,
                            seed=seed)
    (out.ce + out.explicit + 2 * out.implicit).backward()
    ours = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}

    model.zero_grad()
    recorded = []  # the reference forward: every dropout the identity, its input a site, in call order
    handles = [m.register_forward_hook(lambda m, inputs, output: recorded.append((inputs[0], m.p)))
               for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()  # the identity; the hook still records its input
    hidden = model.transformer(ids, attention_mask=mask).last_hidden_state[:, :-1]
    for handle in handles:
        handle.remove()
    model.train()
    sites, ps = [x for x, _ in recorded], [p for _, p in recorded]
    assert len(sites) == 3 and ps == [0.1, 0.2, 0.2]
    target = labels[:, 1:]
    flat_hidden = torch.where((target != -100).reshape(-1, 1), hidden.reshape(-1, 16), 0.0)
    draws = dropreg.sample_targets(flat_hidden.detach(), model.lm_head.weight.detach(), samples=samples, seed=seed)
    signs = [philox_signs(seed, 1, x.numel(), stream=k + 1, dtype=torch.float64).reshape(x.shape)
             for k, x in enumerate(sites)]
    coefs = [dropreg.default_coefficients(p) for p in ps]
    explicit, implicit = authors_terms(hidden, model.lm_head.weight, None, target, sites, draws, signs,
                                       [c[0] for c in coefs], [c[1] for c in coefs])
    ce = F.cross_entropy(model.lm_head(hidden).reshape(-1, V), target.reshape(-1), ignore_index=-100)
    (ce + explicit + 2 * implicit).backward()
    theirs = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    assert abs(explicit.item()) > 1e-8 and abs(implicit.item()) > 1e-8
    torch.testing.assert_close(out.ce, ce, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.explicit, explicit, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.implicit, implicit, rtol=1e-9, atol=1e-12)
    assert_grads_close(ours, theirs, rtol=1e-8, atol=1e-11)


def test_sites_dropout_in_eval_mode_and_the_refusals():
    model = gpt2_with_dropout()
    ids, mask, labels = batch()
    model.eval()  # no dropout acts: no site terms, the plain loss
    out = hf.causal_lm_loss(model, ids, labels, attention_mask=mask, p=0.0, sites="dropout", seed=1)
    plain = hf.causal_lm_loss(model, ids, labels, attention_mask=mask, p=0.0, seed=1)
    assert out.explicit == 0 and out.implicit == 0
    torch.testing.assert_close(out.ce, plain.ce, rtol=0, atol=0)
    model.train()
    with pytest.raises(ValueError, match="sites: expected 'dropout'"):
        hf.causal_lm_loss(model, ids, labels, sites="all")
    with pytest.raises(TypeError, match="samples: only used with sites='dropout'"):
        hf.causal_lm_loss(model, ids, labels, samples=2)
    with pytest.raises(NotImplementedError, match=r"attention applies its own dropout \(attn_pdrop=0.1\)"):
        hf.causal_lm_loss(gpt2_with_dropout(attn_pdrop=0.1).train(), ids, labels, p=0.0, sites="dropout", seed=1)
    assert all(type(m).forward is m.forward.__func__ for m in model.modules()
               if isinstance(m, torch.nn.Dropout))  # the call restored every module's own forward


@pytest.mark.parametrize("typo,hint", [("explict", "explicit"), ("label_smothing", "label_smoothing"),
                                       ("atention_mask", "attention_mask")])
def test_a_misspelled_keyword_is_refused_with_a_hint(typo, hint):
    model = llama()
    ids, mask, labels = batch()
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{typo}' \\(did you mean '{hint}'\\?\\)"):
        hf.causal_lm_loss(model, ids, labels, **{typo: 0.1})


def test_softcap_works_on_any_model_and_never_reaches_the_decoder():
    model = llama()
    ids, mask, labels = batch()
    out = hf.causal_lm_loss(model, ids, labels, attention_mask=mask, softcap=0.2, **OFF)
    logits = 0.2 * torch.tanh(model(ids, attention_mask=mask).logits / 0.2)
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    torch.testing.assert_close(out.loss, F.cross_entropy(logits.reshape(-1, V), shifted.reshape(-1)), rtol=1e-10,
                               atol=1e-12)
    with pytest.raises(ValueError, match="final_logit_softcapping=0.2; got softcap=0.5"):
        hf.causal_lm_loss(gemma2(), ids, labels, softcap=0.5)


def test_the_model_training_flag_switches_the_dropout_terms_only():
    model = llama()
    ids, mask, labels = batch()
    options = dict(attention_mask=mask, p=0.3, z_loss=1e-2, label_smoothing=0.1, seed=3)
    training = hf.causal_lm_loss(model, ids, labels, **options)
    model.eval()
    evaluating = hf.causal_lm_loss(model, ids, labels, **options)
    assert training.explicit != 0 and training.implicit != 0
    assert evaluating.explicit == 0 and evaluating.implicit == 0
    # label smoothing and z-loss stay (the CE-only path in eval, the per-row path in training: the same to rounding)
    torch.testing.assert_close(evaluating.ce, training.ce, rtol=1e-12, atol=0)
    torch.testing.assert_close(evaluating.z_loss, training.z_loss, rtol=1e-12, atol=0)
    assert evaluating.z_loss > 0


@pytest.mark.parametrize("options,error,message", [(dict(p=1.2), ValueError, "p"),
                                                   (dict(z_loss=-1.0), ValueError, "z_loss"),
                                                   (dict(explicit_coef=float("nan")), ValueError, "explicit_coef"),
                                                   (dict(implicit="yes"), TypeError, "implicit: expected a bool")])
def test_trainer_checks_its_options_at_construction(tmp_path, options, error, message):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[])
    with pytest.raises(error, match=message):
        hf.DropregTrainer(model=llama(torch.float32), args=args, **options)
