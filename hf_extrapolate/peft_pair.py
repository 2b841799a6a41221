"""A LoRA adapter paired with its own base in one process: the RL distribution is the adapter's, the base
distribution is the same weights with the adapter off. The base weights are loaded once.

Two strategies:
- **fused**: one forward over the doubled batch `[x; x]`, LoRA applied to the first half only, so every base weight
  is read once per step for both distributions. The cache holds 2R rows. Plain LoRA `Linear` layers run their base
  layer on both halves and add `B(A(x[:R])) * scaling` to the first half (a slice: no index tensors, no host-device
  copy per layer); any other LoRA layer uses PEFT's mixed-batch `adapter_names=["default"] * R + ["__base__"] * R`
  (which builds index lists in Python for every layer and step). Needs an unmerged, non-DoRA LoRA in eval mode,
  sampling or greedy decoding without beams or an assistant model.
- **fallback**: a second forward with the adapter layers switched off (a flag flip on each layer, restored in
  `finally`; PEFT's `disable_adapter()` context costs milliseconds per toggle) and a KV cache of its own (LoRA
  changes k and v, so the base needs its own cache). Works for every decoding mode.

This module does not change the user's PEFT model outside a generate call: hooks and flags are removed/restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .cache_compat import CACHE_KEY
from .reference import ReferencePolicy, check_causal_lm

BASE_ADAPTER = "__base__"


def _tuner_layers(peft_model: Any) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]


def _lora_layers(peft_model: Any) -> list[torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in peft_model.modules() if isinstance(m, LoraLayer)]


def check_pairable(peft_model: Any) -> None:
    """Raise unless `peft_model` is a PEFT model whose adapter can be switched off to recover its base."""
    try:
        from peft import PeftModel
    except ImportError as err:  # pragma: no cover - peft is a dependency
        raise ImportError("Pairing a LoRA adapter with its base needs `peft` (pip install peft).") from err
    if not isinstance(peft_model, PeftModel):
        raise TypeError(
            f"`peft_model` (={type(peft_model).__name__}) must be a `peft.PeftModel`, e.g. "
            "`PeftModel.from_pretrained(base, adapter_dir)`; for two separate checkpoints use `base_model=`."
        )
    check_causal_lm(peft_model, "peft_model")
    layers = _tuner_layers(peft_model)
    if not layers:
        raise ValueError("`peft_model` has no adapter layers: there is nothing to pair with its base.")
    if any(getattr(m, "merged", False) for m in layers):
        raise ValueError(
            "The adapter of `peft_model` is merged into the base weights, so its base distribution is gone. "
            "Call `peft_model.unmerge_adapter()` first (or load the adapter without merging)."
        )


@contextlib.contextmanager
def adapter_disabled(layers: list[torch.nn.Module]) -> Iterator[None]:
    """Switch the adapter layers off for the duration (flag flip, no requires_grad changes), restored in `finally`."""
    previous = [m._disable_adapters for m in layers]
    try:
        for m in layers:
            m._disable_adapters = True
        yield
    finally:
        for m, was in zip(layers, previous):
            m._disable_adapters = was


def fused_unsupported_reason(peft_model: Any, *, num_beams: int = 1, assistant: bool = False) -> str | None:
    """Why the fused doubled-batch path cannot run here (None when it can)."""
    if peft_model.training:
        return "the model is in training mode (PEFT's mixed batches need eval mode)"
    if num_beams > 1:
        return "beam search reorders rows"
    if assistant:
        return "assisted decoding runs a second model on the same cache"
    layers = _tuner_layers(peft_model)
    if any(getattr(m, "_disable_adapters", False) for m in layers):
        # inside the user's `with peft_model.disable_adapter():` the RL distribution is the base one: follow it
        return "the adapter is disabled (`disable_adapter()`), so the RL model runs without it"
    lora = _lora_layers(peft_model)
    if len(lora) != len(layers):
        return "the adapter is not (only) LoRA"
    if any(getattr(m, "use_dora", {}).get(name, False) for m in lora for name in m.active_adapters):
        return "DoRA adapters are not supported by mixed batches"
    if any(len(m.active_adapters) != 1 for m in lora):
        return "more than one adapter is active"
    return None


class FusedLoRAReference(ReferencePolicy):
    """Base logits from the second half of a fused `[x; x]` forward of a PEFT LoRA model.

    Use `fused_forward()` around `peft_model.generate(...)`: it doubles the model's inputs, applies the adapter to
    the first half only, returns the first half's logits to generate and keeps the second half for this object.
    """

    def __init__(self, peft_model: Any):
        self.model = peft_model
        self.num_beams = 1
        self.lora_layers = _lora_layers(peft_model)
        self.adapter = self.lora_layers[0].active_adapters[0]
        self.reset()

    def reset(self, attention_mask: torch.Tensor | None = None) -> None:
        self._logits: torch.Tensor | None = None
        self._length = -1
        self.ids = None
        self.last_reorder = None
        self.started_generation = False
        self._prompt_length: int | None = None

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows, length = input_ids.shape
        if self._logits is None or self._logits.shape[0] != rows or self._length != length:
            raise RuntimeError(
                "The fused LoRA pair has no base logits for these tokens: call generate inside `fused_forward()` "
                "(DirectionalModelForCausalLM does this for you)."
            )
        self.started_generation = self._prompt_length is None or length <= self._prompt_length
        if self.started_generation:
            self._prompt_length = length
        self.ids = input_ids
        return self._logits.to(input_ids.device, torch.float32)

    @contextlib.contextmanager
    def fused_forward(self) -> Iterator[None]:
        """Hooks that turn every forward of the wrapped transformers model into the doubled-batch forward."""
        inner = self.model.get_base_model()
        names: dict[str, Any] = {"rows": None, "list": None}

        def adapter_names(rows: int) -> list[str]:
            if names["rows"] != rows:
                names["rows"], names["list"] = rows, [self.adapter] * rows + [BASE_ADAPTER] * rows
            return names["list"]

        def double(t: Any) -> Any:
            return torch.cat([t, t], dim=0) if isinstance(t, torch.Tensor) and t.dim() >= 1 else t

        def model_pre_hook(module, args, kwargs):
            if args:
                kwargs = {**kwargs, "input_ids": args[0]}
                args = ()
            ids = kwargs.get("input_ids")
            rows = (ids if ids is not None else kwargs["inputs_embeds"]).shape[0]
            cache = kwargs.get(CACHE_KEY)
            self._pending_rows = rows
            self._pending_length = (cache.get_seq_length() if cache is not None else 0) + (
                ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
            )
            for key in ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids"):
                if key in kwargs and kwargs[key] is not None:
                    if key == "position_ids" and kwargs[key].shape[0] == 1 and rows > 1:
                        continue  # broadcast position ids stay broadcast
                    kwargs[key] = double(kwargs[key])
            self._names = adapter_names(rows)
            return args, kwargs

        def model_post_hook(module, args, kwargs, output):
            rows = self._pending_rows
            logits = output.logits
            self._logits = logits[rows:, -1]
            self._length = self._pending_length
            output["logits"] = logits[:rows]
            return output

        def lora_pre_hook(module, args, kwargs):
            kwargs["adapter_names"] = self._names
            return args, kwargs

        adapter = self.adapter

        def first_half_lora_hook(module, args, kwargs, output):
            # the layer ran with its adapter switched off: output = base_layer(x) for both halves
            x = args[0] if args else kwargs["x"]
            rows = x.shape[0] // 2
            lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
            delta = lora_b(lora_a(module.lora_dropout[adapter](x[:rows].to(lora_a.weight.dtype))))
            output[:rows] += (delta * module.scaling[adapter]).to(output.dtype)
            return output

        fast = [m for m in self.lora_layers if _plain_lora_linear(m, adapter)]
        slow = [m for m in self.lora_layers if not _plain_lora_linear(m, adapter)]
        handles = [
            inner.register_forward_pre_hook(model_pre_hook, with_kwargs=True),
            inner.register_forward_hook(model_post_hook, with_kwargs=True),
        ]
        handles += [m.register_forward_hook(first_half_lora_hook, with_kwargs=True) for m in fast]
        handles += [m.register_forward_pre_hook(lora_pre_hook, with_kwargs=True) for m in slow]
        disabled = [m._disable_adapters for m in fast]
        try:
            for m in fast:
                m._disable_adapters = True
            yield
        finally:
            for m, was in zip(fast, disabled):
                m._disable_adapters = was
            for h in handles:
                h.remove()
            self._names = None


def _plain_lora_linear(layer: torch.nn.Module, adapter: str) -> bool:
    """Whether `layer` is PEFT's vanilla LoRA `Linear` for `adapter` (no DoRA or other variant), whose first-half
    update `B(A(x)) * scaling` the fused path adds itself."""
    from peft.tuners.lora.layer import Linear

    return (
        type(layer) is Linear
        and adapter in layer.lora_A
        and adapter not in getattr(layer, "lora_variant", {})
        and not getattr(layer, "merged", False)
    )
