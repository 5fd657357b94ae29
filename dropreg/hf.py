"""Hugging Face transformers (5.x) causal language models: the head's loss without the N x V logits.

    out = dropreg.hf.causal_lm_loss(model, input_ids, labels, attention_mask=mask, p=0.1)
    trainer = dropreg.hf.DropregTrainer(model=model, args=args, train_dataset=data, p=0.1)

``causal_lm_loss`` runs the model's decoder, takes the head's weight and bias, and applies HF's causal
label shift, ``ignore_index=-100`` and its gradient-accumulation reduction (``num_items_in_batch``), so
with ``explicit=False, implicit=False`` its ``.loss`` is ``model(input_ids, labels=labels, ...).loss``.
``import dropreg`` does not import this module; this module imports transformers only for the Trainer.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import sys

from typing import Optional

from torch import Tensor, nn

from ._api import LinearCrossEntropyOutput, linear_cross_entropy
from ._checks import check_coefficient, check_probability, default_coefficients

IGNORE_INDEX = -100  # HF's causal-LM loss ignores this label

# Keyword arguments transformers documents for a decoder's forward beyond its named parameters (HF forwards take
# **kwargs, so a signature alone cannot tell a model input from a typo): the attention backends' packed-sequence
# arguments and the generation-time ones.
HF_MODEL_KWARGS = ("attention_mask", "position_ids", "inputs_embeds", "past_key_values", "use_cache", "cache_position",
                   "token_type_ids", "head_mask", "output_attentions", "output_hidden_states", "return_dict",
                   "encoder_hidden_states", "encoder_attention_mask", "cu_seq_lens_q", "cu_seq_lens_k",
                   "max_length_q", "max_length_k", "shift_labels", "logits_to_keep")
_BASE_NAMES = ("model", "transformer", "gpt_neox", "decoder", "language_model")


def _text_config(model):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config, config.get_text_config()
    return config, config


def _config_value(model, name):
    for config in _text_config(model):
        value = getattr(config, name, None) if config is not None else None
        if value is not None:
            return value
    return None


def find_decoder(model: nn.Module) -> nn.Module:
    """The module that maps ``input_ids`` to the last hidden state: ``get_decoder()`` or the base model."""
    candidates = []
    if hasattr(model, "get_decoder"):
        try:
            candidates.append(model.get_decoder())
        except Exception:  # some models raise instead of returning; fall back to the attribute names
            pass
    prefix = getattr(model, "base_model_prefix", None)
    names = ((prefix,) if isinstance(prefix, str) and prefix else ()) + _BASE_NAMES
    candidates += [getattr(model, name, None) for name in names]
    for module in candidates:
        # get_decoder() returns the model itself when it finds nothing: running that would build the logits
        if isinstance(module, nn.Module) and module is not model:
            return module
    raise ValueError(
        f"causal_lm_loss: cannot find the decoder of {type(model).__name__} (tried get_decoder() and the "
        f"attributes {', '.join(names)}); pass decoder=<the module that returns the last hidden state>")


def _is_fsdp2(model: nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # a model can only be sharded once the module is imported
    return fsdp is not None and isinstance(model, getattr(fsdp, "FSDPModule", ()))


def _data_parallel_parts(model: nn.Module):
    """``(wrapper, inner model)`` for a model whose own call does the data-parallel work (DistributedDataParallel's
    wrapper; an FSDP2 model is its own wrapper: its root call gathers the parameters), or ``(None, model)``."""
    if isinstance(model, nn.DataParallel):
        raise NotImplementedError("causal_lm_loss: torch.nn.DataParallel runs replicas of the model, which the fused "
                                  "loss cannot reach; use DistributedDataParallel (torchrun) instead")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model, model.module
    if _is_fsdp2(model):
        return model, model
    return None, model


def _call_through(wrapper: nn.Module, inner: nn.Module, compute):
    """``compute()`` run as ``inner``'s forward inside ``wrapper()``, so the wrapper's forward logic (DDP's
    preparation of the gradient all-reduce, its no_sync) applies to the loss as it would to ``model(...)``."""
    own = vars(inner).get("forward")  # an instance-level forward (accelerate patches one), restored after
    inner.forward = compute
    try:
        return wrapper()
    finally:
        if own is None:
            del inner.forward
        else:
            inner.forward = own


def _lora_delta(head: nn.Module, adapter: str):
    """``(delta_weight, delta_bias)`` of one active LoRA adapter of a PEFT LoRA ``Linear``: ``scaling B A`` (and
    ``scaling b_B`` with ``lora_bias``), exactly its contribution when its dropout does nothing; else an error."""
    name = type(head).__name__
    lora_a, lora_b = head.lora_A[adapter], head.lora_B[adapter]
    if getattr(head, "use_dora", {}).get(adapter, False) or getattr(head, "fan_in_fan_out", False):
        raise NotImplementedError(f"causal_lm_loss: the LM head is a PEFT {name} with DoRA or fan_in_fan_out "
                                  f"(adapter {adapter!r}); merge it (merge_adapter()) or leave the head unadapted")
    dropout = head.lora_dropout[adapter] if adapter in getattr(head, "lora_dropout", {}) else nn.Identity()
    if head.training and not isinstance(dropout, nn.Identity) and getattr(dropout, "p", 0.0) > 0:
        raise NotImplementedError(
            f"causal_lm_loss: the LM head's LoRA adapter {adapter!r} has lora_dropout={dropout.p}: dropout on the "
            f"head's input is not a weight, so it cannot be folded into the fused loss; use lora_dropout=0.0 on the "
            f"head (dropreg's terms model dropout there) or leave the head unadapted")
    scale = head.scaling[adapter]
    delta_bias = None if lora_b.bias is None else scale * lora_b.bias
    return scale * (lora_b.weight @ lora_a.weight), delta_bias


def _unwrap_head(head: nn.Module):
    """``(base head, extra weight, extra bias)``: PEFT wraps the head in a layer with ``.base_layer``; an active LoRA
    adapter adds ``scaling B A`` to the weight (differentiable, so the adapter trains), other adapters are refused."""
    extra_weight = extra_bias = None
    while hasattr(head, "base_layer"):
        inactive = (getattr(head, "disable_adapters", False) or getattr(head, "merged", False)
                    or not getattr(head, "active_adapters", ()))
        if not inactive:
            if not (hasattr(head, "lora_A") and hasattr(head, "lora_B") and hasattr(head, "scaling")):
                raise NotImplementedError(
                    f"causal_lm_loss: the output embeddings are a PEFT {type(head).__name__} with active adapters "
                    f"{list(getattr(head, 'active_adapters', []))}, not LoRA; merge them (merge_adapter()) or do not "
                    f"adapt the LM head (leave it out of target_modules)")
            for adapter in head.active_adapters:
                if adapter not in head.lora_A:
                    continue
                delta_weight, delta_bias = _lora_delta(head, adapter)
                extra_weight = delta_weight if extra_weight is None else extra_weight + delta_weight
                if delta_bias is not None:
                    extra_bias = delta_bias if extra_bias is None else extra_bias + delta_bias
        head = head.base_layer
    return head, extra_weight, extra_bias


def _head_parameters(model: nn.Module):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"causal_lm_loss: {type(model).__name__}.get_output_embeddings() returned no LM head")
    head, extra_weight, extra_bias = _unwrap_head(head)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise NotImplementedError(
            f"causal_lm_loss: expected a linear LM head with a 2-D weight, got {type(head).__name__}")
    bias = getattr(head, "bias", None)
    bias = bias if isinstance(bias, Tensor) else None
    if extra_weight is not None:  # a LoRA head: W + scaling B A, one V x d tensor (never N x V)
        weight = weight + extra_weight.to(weight.dtype)
    if extra_bias is not None:
        bias = extra_bias.to(weight.dtype) if bias is None else bias + extra_bias.to(bias.dtype)
    return weight, bias


def _logit_scale(model: nn.Module) -> float:
    """The factor HF multiplies the logits by; it is linear, so it is folded into the hidden states."""
    scale = 1.0
    granite = _config_value(model, "logits_scaling")  # Granite: logits / logits_scaling
    if granite is not None:
        scale /= float(granite)
    cohere = _config_value(model, "logit_scale")  # Cohere: logits * logit_scale
    if cohere is not None:
        scale *= float(cohere)
    return scale


_ATTENTION_DROPOUT_NAMES = ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob")


def _attention_dropout(model: nn.Module) -> Optional[tuple[str, float]]:
    """``(config name, p)`` of attention dropout the model's attention function applies itself, if any."""
    for name in _ATTENTION_DROPOUT_NAMES:
        value = _config_value(model, name)
        if isinstance(value, (int, float)) and value > 0:
            return name, float(value)
    return None


@contextlib.contextmanager
def dropout_as_sites(model: nn.Module):
    """For the duration, every ``nn.Dropout`` of ``model`` that would act (training, ``p > 0``) is the identity and
    records its input as a dropout site: yields ``(sites, ps)``, filled as the forward runs, in call order.

    Attention dropout that the attention function applies itself (HF's ``dropout=`` of the attention interface,
    eager or SDPA alike) is not a module call: a model in training with attention dropout is refused."""
    sites: list[Tensor] = []
    ps: list[float] = []
    kinds = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
    acting = [m for m in model.modules() if isinstance(m, kinds) and m.training and m.p > 0]
    for module in acting:
        if type(module) is not nn.Dropout:
            raise NotImplementedError(f"causal_lm_loss(sites='dropout'): {type(module).__name__}(p={module.p}) drops "
                                      f"whole channels or keeps the mean and variance (not elementwise dropout), "
                                      f"which dropreg's terms do not model; set its p to 0")
    attention = _attention_dropout(model) if model.training else None
    if attention is not None:
        raise NotImplementedError(
            f"causal_lm_loss(sites='dropout'): the model's attention applies its own dropout ({attention[0]}="
            f"{attention[1]}) inside the attention function, not through an nn.Dropout call, so it cannot be made a "
            f"site and would still drop during the call; build the model with {attention[0]}=0.0")

    def recording(module):
        def forward(x):
            if not x.requires_grad:  # e.g. a frozen embedding's output: a leaf the sites' products can start from
                x = x.detach().requires_grad_()
            sites.append(x)
            ps.append(float(module.p))
            return x
        return forward

    saved = [(module, vars(module).get("forward")) for module in acting]
    for module in acting:
        module.forward = recording(module)
    try:
        yield sites, ps
    finally:
        for module, own in saved:
            if own is None:
                del module.forward
            else:
                module.forward = own


def causal_lm_loss(model: nn.Module, input_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None, *,
                   num_items_in_batch=None, p: float = 0.1, explicit: bool = True, implicit: bool = True,
                   explicit_coef: Optional[float] = None, implicit_coef: Optional[float] = None,
                   seed: Optional[int] = None, decoder: Optional[nn.Module] = None,
                   label_smoothing: float = 0.0, weight: Optional[Tensor] = None, z_loss: float = 0.0,
                   sites: Optional[str] = None, samples: Optional[int] = None, softcap: Optional[float] = None,
                   backend: str = "auto", **model_inputs) -> LinearCrossEntropyOutput:
    """HF's causal-LM loss of ``model`` plus dropout's regularizers at the head, without the logits.

    ``model_inputs`` (attention_mask, position_ids, inputs_embeds, ...) go to the decoder. ``labels`` are
    shifted as HF does (``labels[..., 1:]`` against ``hidden[..., :-1, :]``) unless ``shift_labels`` is
    given (already aligned with the hidden states). ``num_items_in_batch`` given: the sum over tokens
    divided by it (HF's gradient accumulation); else the mean over non-ignored tokens.
    ``decoder``: the module returning the last hidden state, when it cannot be found. ``label_smoothing``,
    ``weight`` (class weights) and ``z_loss`` are :func:`dropreg.linear_cross_entropy`'s; with class weights and
    ``num_items_in_batch``, the latter is what the sum is divided by.

    ``softcap``: caps the logits (:func:`dropreg.linear_cross_entropy`'s); a model whose config has
    ``final_logit_softcapping`` (Gemma 2) is capped by it without asking. Keyword arguments that are neither this
    function's, the decoder's named parameters nor transformers' documented model inputs (``HF_MODEL_KWARGS``) are
    refused with a TypeError naming them (a misspelled option would otherwise vanish into the decoder's ``**kwargs``).

    The model's ``training`` flag switches the explicit and implicit terms, as it switches dropout: in eval mode the
    loss is the cross entropy with z-loss and label smoothing, without the dropout terms.

    ``sites="dropout"``: the paper's method at every dropout site (docs/math.md 11.5). Every ``nn.Dropout`` of the
    model that would act (training, ``p > 0``) runs as the identity for this call and its input becomes a site with
    that module's ``p`` (``linear_cross_entropy(..., sites=...)``; ``samples`` draws per row for the explicit term,
    default 1); ``p`` stays the head input's own exact terms. In eval mode no module acts: no site terms. Attention
    dropout applied inside the attention function (eager or SDPA) is not a module call: a model in training with
    attention dropout > 0 is refused.

    ``model`` may be wrapped in ``DistributedDataParallel`` or sharded with FSDP2 (``fully_shard``): the loss is then
    computed inside the wrapper's (or the FSDP2 root's) call, with the inner model's ``forward`` swapped for the
    fused loss during the call, so that DDP synchronizes the gradients, and FSDP2 gathers the root's parameters
    (the head's among them) and reduce-scatters the gradients, as they do for ``model(...)``. ``DataParallel`` is
    refused (it runs replicas of the module).
    """
    wrapper, inner = _data_parallel_parts(model)
    compute = functools.partial(
        _unwrapped_loss, inner, input_ids, labels, num_items_in_batch=num_items_in_batch, p=p, explicit=explicit,
        implicit=implicit, explicit_coef=explicit_coef, implicit_coef=implicit_coef, seed=seed, decoder=decoder,
        label_smoothing=label_smoothing, weight=weight, z_loss=z_loss, sites=sites, samples=samples, softcap=softcap,
        backend=backend, **model_inputs)
    if wrapper is None:
        return compute()
    return _call_through(wrapper, inner, lambda *_args, **_kwargs: compute())


def _unwrapped_loss(model: nn.Module, input_ids, labels, *, num_items_in_batch, p, explicit, implicit,
                    explicit_coef, implicit_coef, seed, decoder, label_smoothing, weight, z_loss, sites, samples,
                    softcap, backend, **model_inputs) -> LinearCrossEntropyOutput:
    """:func:`causal_lm_loss` of a model that is not wrapped (or, inside the wrapper's call, of the inner model)."""
    shift_labels = model_inputs.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        raise ValueError("causal_lm_loss: pass labels (shifted here) or shift_labels (already shifted)")
    model_inputs.pop("logits_to_keep", None)  # every position is needed for the loss
    scale = _logit_scale(model)
    configured = _config_value(model, "final_logit_softcapping")  # Gemma 2: cap * tanh(logits / cap), after the scale
    if softcap is not None and configured is not None and float(softcap) != float(configured):
        raise ValueError(f"softcap: the model's config caps the logits at final_logit_softcapping={configured}; got "
                         f"softcap={softcap}")
    softcap = configured if softcap is None else softcap
    head_weight, bias = _head_parameters(model)
    decoder = find_decoder(model) if decoder is None else decoder
    _check_model_inputs(decoder, model_inputs)
    if not model.training:  # dropout is off, and with it dropout's terms
        explicit = implicit = False
    if sites not in (None, "dropout"):
        raise ValueError(f"sites: expected 'dropout' (every nn.Dropout of the model is a site) or None, got {sites!r}")
    if sites is None and samples is not None:
        raise TypeError("samples: only used with sites='dropout'")

    with dropout_as_sites(model) if sites else contextlib.nullcontext((None, None)) as (site_list, site_ps):
        outputs = decoder(input_ids=input_ids, **model_inputs)
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None:
        hidden = outputs[0]
    if shift_labels is None:
        hidden, target = hidden[..., :-1, :], labels[..., 1:]
    else:
        target = shift_labels
    target = target.to(hidden.device)
    if scale != 1.0:
        # z * s = (h s) W^T + b s: the same loss and gradients, up to rounding
        hidden = hidden * scale
        bias = None if bias is None else bias * scale

    reduction = "mean" if num_items_in_batch is None else "sum"
    # a bf16/fp16 model's loss comes back in fp32 (linear_cross_entropy's losses), as HF's ForCausalLMLoss returns it
    site_options = {} if site_list is None else dict(sites=site_list, site_p=site_ps, samples=samples)
    out = linear_cross_entropy(hidden, head_weight, target, linear_bias=bias, p=p, explicit=explicit,
                               implicit=implicit, explicit_coef=explicit_coef, implicit_coef=implicit_coef,
                               seed=seed, ignore_index=IGNORE_INDEX, reduction=reduction,
                               label_smoothing=label_smoothing, weight=weight, z_loss=z_loss,
                               softcap=None if softcap is None else float(softcap), backend=backend, **site_options)
    if num_items_in_batch is None:
        return out
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(out.ce.device)
    return LinearCrossEntropyOutput(*(term / num_items_in_batch for term in out))


_OWN_KEYWORDS = tuple(name for name in inspect.signature(causal_lm_loss).parameters
                      if name not in ("model", "model_inputs"))


def _check_model_inputs(decoder, model_inputs: dict) -> None:
    try:  # a module's forward, or any callable passed as decoder=
        parameters = inspect.signature(getattr(decoder, "forward", decoder)).parameters
    except (TypeError, ValueError):
        parameters = {}
    named = {name for name, parameter in parameters.items()
             if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)}
    known = named | set(HF_MODEL_KWARGS)
    for key in model_inputs:
        if key not in known:
            hint = difflib.get_close_matches(key, _OWN_KEYWORDS + tuple(sorted(known)), n=1)
            raise TypeError(f"causal_lm_loss: unexpected keyword argument {key!r}"
                            f"{f' (did you mean {hint[0]!r}?)' if hint else ''}: neither dropreg's option nor an "
                            f"input of the decoder ({type(decoder).__name__}) nor a documented transformers model "
                            f"input")


def _step_seed(base: int, step: int, micro: int) -> int:
    # a different sign stream for every optimizer step and every accumulated micro-batch
    return (int(base) * 1_000_003 + int(step) * 1_009 + int(micro)) % (2 ** 62)


def __getattr__(name):
    # the Trainer subclass needs transformers; build it on first use so `import dropreg.hf` stays cheap
    if name == "DropregTrainer":
        cls = _make_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_trainer_class():
    import transformers

    class DropregTrainer(transformers.Trainer):
        """``transformers.Trainer`` whose loss is :func:`causal_lm_loss` (causal LMs only).

        Keyword arguments ``p, explicit, implicit, explicit_coef, implicit_coef`` set the regularizers, ``sites``
        and ``samples`` the every-site terms (``sites="dropout"``: see :func:`causal_lm_loss`) and ``z_loss`` the
        z-loss, checked at construction; in eval mode its loss is the cross entropy (label smoothing included, no
        z-loss), which Trainer reports as ``eval_loss``.
        ``args.label_smoothing_factor`` is honoured. Signs change every step (seeded from ``args.seed``, the global
        step and the micro-batch index).
        """

        def __init__(self, *args, p: float = 0.1, explicit: bool = True, implicit: bool = True,
                     explicit_coef: Optional[float] = None, implicit_coef: Optional[float] = None,
                     z_loss: float = 0.0, sites: Optional[str] = None, samples: Optional[int] = None,
                     **kwargs):
            if sites not in (None, "dropout"):
                raise ValueError(f"sites: expected 'dropout' or None, got {sites!r}")
            default_explicit, default_implicit = default_coefficients(check_probability(p))
            check_coefficient("explicit_coef", explicit_coef, default_explicit)
            check_coefficient("implicit_coef", implicit_coef, default_implicit)
            check_coefficient("z_loss", z_loss, 0.0)
            for name, value in (("explicit", explicit), ("implicit", implicit)):
                if not isinstance(value, bool):
                    raise TypeError(f"{name}: expected a bool, got {value!r}")
            super().__init__(*args, **kwargs)
            if self.compute_loss_func is not None:
                raise NotImplementedError("DropregTrainer: compute_loss_func is not supported (the loss is "
                                          "dropreg.hf.causal_lm_loss)")
            # args.label_smoothing_factor: the fused loss smooths the labels itself (F.cross_entropy's definition,
            # which HF's LabelSmoother also computes)
            smoothing = self.label_smoother.epsilon if self.label_smoother is not None else 0.0
            self.dropreg_options = dict(p=p, explicit=explicit, implicit=implicit, explicit_coef=explicit_coef,
                                        implicit_coef=implicit_coef, label_smoothing=smoothing, z_loss=z_loss,
                                        sites=sites, samples=samples)
            # causal_lm_loss uses num_items_in_batch, so let the Trainer count it and not rescale for GA
            self.model_accepts_loss_kwargs = True
            self._dropreg_step = (-1, 0)

        def _dropreg_seed(self) -> int:
            step, micro = self._dropreg_step
            micro = micro + 1 if step == self.state.global_step else 0
            self._dropreg_step = (self.state.global_step, micro)
            return _step_seed(self.args.seed, self.state.global_step, micro)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inner = self.accelerator.unwrap_model(model)
            # DDP: through the wrapper (causal_lm_loss), so gradients are all-reduced; the autocast that accelerate
            # puts around the model's own forward (Trainer's bf16=True) is applied here, as that forward never runs
            model = model if isinstance(model, nn.parallel.DistributedDataParallel) else inner
            inputs = dict(inputs)
            input_ids = inputs.pop("input_ids", None)
            labels = inputs.pop("labels", None)
            options = dict(self.dropreg_options)
            if inner.training:
                seed = self._dropreg_seed()
            else:  # causal_lm_loss drops the dropout terms in eval mode itself; eval_loss stays the cross entropy
                options.update(z_loss=0.0, sites=None, samples=None)
                seed = None
            with self.accelerator.autocast():
                out = causal_lm_loss(model, input_ids, labels, num_items_in_batch=num_items_in_batch,
                                     seed=seed, **options, **inputs)
            loss = out.loss
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # as Trainer.compute_loss: each rank divided by the global count, and DDP averages gradients
                tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                loss = loss * (self.accelerator.num_processes // tp if self.args.n_gpu <= 1 else self.args.n_gpu)
            return (loss, out) if return_outputs else loss

    DropregTrainer.__module__ = __name__
    return DropregTrainer
