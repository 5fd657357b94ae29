"""Hugging Face transformers (5.x) causal language models: the head's loss without the N x V logits.

    out = dropreg.hf.causal_lm_loss(model, input_ids, labels, attention_mask=mask, p=0.1)
    trainer = dropreg.hf.DropregTrainer(model=model, args=args, train_dataset=data, p=0.1)

``causal_lm_loss`` runs the model's decoder, takes the head's weight and bias, and applies HF's causal
label shift, ``ignore_index=-100`` and its gradient-accumulation reduction (``num_items_in_batch``), so
with ``explicit=False, implicit=False`` its ``.loss`` is ``model(input_ids, labels=labels, ...).loss``.
``import dropreg`` does not import this module; this module imports transformers only for the Trainer.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._api import LinearCrossEntropyOutput, linear_cross_entropy

IGNORE_INDEX = -100  # HF's causal-LM loss ignores this label
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


def _unwrap_head(head: nn.Module) -> nn.Module:
    # PEFT wraps the head in a layer with .base_layer; its weight is the head only when no adapter acts
    while hasattr(head, "base_layer"):
        inactive = (getattr(head, "disable_adapters", False) or getattr(head, "merged", False)
                    or not getattr(head, "active_adapters", ()))
        if not inactive:
            raise NotImplementedError(
                f"causal_lm_loss: the output embeddings are a PEFT {type(head).__name__} with active adapters "
                f"{list(getattr(head, 'active_adapters', []))}; merge them (merge_adapter()) or do not adapt "
                f"the LM head (leave it out of target_modules)")
        head = head.base_layer
    return head


def _head_parameters(model: nn.Module):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"causal_lm_loss: {type(model).__name__}.get_output_embeddings() returned no LM head")
    head = _unwrap_head(head)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise NotImplementedError(
            f"causal_lm_loss: expected a linear LM head with a 2-D weight, got {type(head).__name__}")
    bias = getattr(head, "bias", None)
    return weight, bias if isinstance(bias, Tensor) else None


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


def causal_lm_loss(model: nn.Module, input_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None, *,
                   num_items_in_batch=None, p: float = 0.1, explicit: bool = True, implicit: bool = True,
                   explicit_coef: Optional[float] = None, implicit_coef: Optional[float] = None,
                   seed: Optional[int] = None, decoder: Optional[nn.Module] = None,
                   label_smoothing: float = 0.0, weight: Optional[Tensor] = None, z_loss: float = 0.0,
                   backend: str = "auto", **model_inputs) -> LinearCrossEntropyOutput:
    """HF's causal-LM loss of ``model`` plus dropout's regularizers at the head, without the logits.

    ``model_inputs`` (attention_mask, position_ids, inputs_embeds, ...) go to the decoder. ``labels`` are
    shifted as HF does (``labels[..., 1:]`` against ``hidden[..., :-1, :]``) unless ``shift_labels`` is
    given (already aligned with the hidden states). ``num_items_in_batch`` given: the sum over tokens
    divided by it (HF's gradient accumulation); else the mean over non-ignored tokens.
    ``decoder``: the module returning the last hidden state, when it cannot be found. ``label_smoothing``,
    ``weight`` (class weights) and ``z_loss`` are :func:`dropreg.linear_cross_entropy`'s; with class weights and
    ``num_items_in_batch``, the latter is what the sum is divided by.
    """
    shift_labels = model_inputs.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        raise ValueError("causal_lm_loss: pass labels (shifted here) or shift_labels (already shifted)")
    model_inputs.pop("logits_to_keep", None)  # every position is needed for the loss
    scale = _logit_scale(model)
    softcap = _config_value(model, "final_logit_softcapping")  # Gemma 2: cap * tanh(logits / cap), after the scale
    head_weight, bias = _head_parameters(model)
    decoder = find_decoder(model) if decoder is None else decoder

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
    out = linear_cross_entropy(hidden, head_weight, target, linear_bias=bias, p=p, explicit=explicit,
                               implicit=implicit, explicit_coef=explicit_coef, implicit_coef=implicit_coef,
                               seed=seed, ignore_index=IGNORE_INDEX, reduction=reduction,
                               label_smoothing=label_smoothing, weight=weight, z_loss=z_loss,
                               softcap=None if softcap is None else float(softcap), backend=backend)
    if num_items_in_batch is None:
        return out
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(out.ce.device)
    return LinearCrossEntropyOutput(*(term / num_items_in_batch for term in out))


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

        Keyword arguments ``p, explicit, implicit, explicit_coef, implicit_coef`` set the regularizers and
        ``z_loss`` the z-loss; in eval mode only the cross entropy is computed. ``args.label_smoothing_factor`` is honoured. Signs change every step (seeded from
        ``args.seed``, the global step and the micro-batch index).
        """

        def __init__(self, *args, p: float = 0.1, explicit: bool = True, implicit: bool = True,
                     explicit_coef: Optional[float] = None, implicit_coef: Optional[float] = None,
                     z_loss: float = 0.0, **kwargs):
            super().__init__(*args, **kwargs)
            if self.compute_loss_func is not None:
                raise NotImplementedError("DropregTrainer: compute_loss_func is not supported (the loss is "
                                          "dropreg.hf.causal_lm_loss)")
            # args.label_smoothing_factor: the fused loss smooths the labels itself (F.cross_entropy's definition,
            # which HF's LabelSmoother also computes)
            smoothing = self.label_smoother.epsilon if self.label_smoother is not None else 0.0
            self.dropreg_options = dict(p=p, explicit=explicit, implicit=implicit, explicit_coef=explicit_coef,
                                        implicit_coef=implicit_coef, label_smoothing=smoothing, z_loss=z_loss)
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
            inputs = dict(inputs)
            input_ids = inputs.pop("input_ids", None)
            labels = inputs.pop("labels", None)
            options = dict(self.dropreg_options)
            if inner.training:
                seed = self._dropreg_seed()
            else:
                options.update(explicit=False, implicit=False, z_loss=0.0)
                seed = None
            out = causal_lm_loss(inner, input_ids, labels, num_items_in_batch=num_items_in_batch,
                                 seed=seed, **options, **inputs)
            loss = out.loss
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # as Trainer.compute_loss: each rank divided by the global count, and DDP averages gradients
                tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                loss = loss * (self.accelerator.num_processes // tp if self.args.n_gpu <= 1 else self.args.n_gpu)
            return (loss, out) if return_outputs else loss

    DropregTrainer.__module__ = __name__
    return DropregTrainer
