"""`DirectionalModelForCausalLM`: an RL model and its base as one generating model.

```python
model = DirectionalModelForCausalLM.from_pretrained("rl-model", base_model="base-model",
                                                    extrapolation_config=ExtrapolationConfig(gamma=0.1))
out = model.generate(**inputs, do_sample=True, top_p=0.7, max_new_tokens=512)
```

`generate()` takes every argument of transformers' `generate` and runs it on the RL model with a
`DirectionalLogitsProcessor` appended to the logits processors. It passes the attention mask, `do_sample` and
`num_beams` to the processor, moves the resolved temperature / top-k / top-p inside (they warp each component) and
keeps the outer warpers neutral, so the sampling settings are written once, as with any HF model. The replacement
statistics come back on the output (`out.replace_ratio` with `return_dict_in_generate=True`) and on the model
(`model.last_replace_ratio`).

The base model is not a submodule (its weights are neither saved nor moved with the RL model) and is reachable as
`model.reference_model`; `model.base_model` keeps its transformers meaning. A PEFT LoRA adapter is paired with its
own base in one process (`from_pretrained(adapter_dir)` / `from_peft(peft_model)`): see `hf_extrapolate.peft_pair`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, GenerationMixin, LogitsProcessorList

from .cache_compat import output_cache
from .config import CONFIG_NAME, ExtrapolationConfig
from .lookahead import lookahead_generate
from .peft_pair import FusedLoRAReference, _tuner_layers, adapter_disabled, check_pairable, fused_unsupported_reason
from .processor import DirectionalLogitsProcessor
from .reference import ReferenceModel, check_causal_lm
from .version import __version__

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
# warpers applied inside (per component); everything else is refused rather than silently applied to the mixture
INNER_WARPERS = ("temperature", "top_k", "top_p")
UNSUPPORTED_WARPERS = {
    "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None,
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "sequence_bias": None,
    "exponential_decay_length_penalty": None, "guidance_scale": 1.0,
}
# keywords whose None means "the checkpoint's default" when read from a config object (kept as given in the call)
_FILLED_BY_DEFAULTS = ("eos_token_id", "pad_token_id", "bos_token_id", "do_sample", "num_beams", "temperature",
                       "top_k", "top_p")
STRATEGIES = ("auto", "fused", "fallback")


def _is_dir_with(path: Any, name: str) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, name))


class DirectionalModelForCausalLM(torch.nn.Module, GenerationMixin):
    """An RL-tuned causal LM generating with selective replacement / extrapolation against its base model.

    Args:
        rl_model (`PreTrainedModel` or `PeftModel`): the model that generates (its forward is this model's forward).
        base_model (`PreTrainedModel`, *optional*): the base model. Omit it when `rl_model` is a PEFT model: the
            base is then the same weights with the adapter off.
        extrapolation_config (`ExtrapolationConfig`, *optional*): defaults to `ExtrapolationConfig()`. Its
            temperature / top-k / top-p, if set, become this model's default sampling settings.
        lora_strategy (`str`, defaults to `"auto"`): for a PEFT pair, `"fused"`, `"fallback"` or `"auto"` (fused
            where PEFT allows it).
        base_model_name_or_path (`str`, *optional*): what `save_pretrained` records to restore the base.
        vocab_size (`int`, *optional*): the tokenizer's size, when the two models' embedding matrices are padded
            differently (recorded automatically by `from_pretrained` when the checkpoints ship a tokenizer).
    """

    def __init__(
        self,
        rl_model: Any,
        base_model: Any | None = None,
        extrapolation_config: ExtrapolationConfig | None = None,
        *,
        lora_strategy: str = "auto",
        base_model_name_or_path: str | None = None,
        vocab_size: int | None = None,
    ):
        super().__init__()
        check_causal_lm(rl_model, "rl_model")
        if lora_strategy not in STRATEGIES:
            raise ValueError(f"`lora_strategy` (={lora_strategy!r}) must be one of {STRATEGIES}.")
        is_peft = hasattr(rl_model, "peft_config")
        if base_model is None:
            if not is_peft:
                raise ValueError(
                    "`base_model` is required unless `rl_model` is a PEFT model: pass the base checkpoint "
                    "(`base_model=`) or pair a LoRA adapter with `from_peft(peft_model)`."
                )
            check_pairable(rl_model)
        else:
            check_causal_lm(base_model, "base_model")
        if extrapolation_config is None:
            extrapolation_config = ExtrapolationConfig()
        if not isinstance(extrapolation_config, ExtrapolationConfig):
            raise TypeError(
                f"`extrapolation_config` must be an ExtrapolationConfig, got {type(extrapolation_config).__name__}."
            )
        self.rl_model = rl_model
        # not a submodule: the base weights are neither saved, counted nor moved with the RL model
        object.__setattr__(self, "_reference_model", base_model)
        self.extrapolation_config = extrapolation_config
        self.lora_strategy = lora_strategy
        self.vocab_size = vocab_size
        self.is_lora_pair = base_model is None
        self.base_model_name_or_path = base_model_name_or_path or (
            getattr(base_model, "name_or_path", None) if base_model is not None else None
        )
        self.generation_config = copy.deepcopy(getattr(rl_model, "generation_config", None) or GenerationConfig())
        defaults = ExtrapolationConfig()
        for name in INNER_WARPERS:  # the config's warpers are the model's default sampling settings
            if getattr(extrapolation_config, name) != getattr(defaults, name):
                setattr(self.generation_config, name, getattr(extrapolation_config, name))
        self.last_replace_ratio: torch.Tensor | None = None
        self.last_processor: DirectionalLogitsProcessor | None = None
        self.last_lora_strategy: str | None = None  # "separate", "fused" or "fallback": what the last generate ran
        self.last_lookahead_stats: dict | None = None  # lookahead: rounds, drafted, accepted and the k of each round
        # lookahead="auto": one k chooser per (batch size, device), keeping the measured draft / check costs
        self._lookahead_choosers: dict = {}

    # ------------------------------------------------------------------ transformers-like surface
    @property
    def reference_model(self) -> Any:
        """The base model (for a LoRA pair: the PEFT model itself, run with its adapter off)."""
        return self._reference_model if self._reference_model is not None else self.rl_model

    @property
    def config(self):
        return self.rl_model.config

    @property
    def device(self) -> torch.device:
        return self.rl_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.rl_model.dtype

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def get_input_embeddings(self):
        return self.rl_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.rl_model.get_output_embeddings()

    def forward(self, *args, **kwargs):
        """The RL model's forward."""
        return self.rl_model(*args, **kwargs)

    # ------------------------------------------------------------------ loading / saving
    tokenizer: Any = None  # the RL model's tokenizer when known (saved with the pair)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        base_model: str | os.PathLike | Any | None = None,
        extrapolation_config: ExtrapolationConfig | None = None,
        base_model_kwargs: dict | None = None,
        lora_strategy: str = "auto",
        check_tokenizers: bool = True,
        **kwargs: Any,
    ) -> DirectionalModelForCausalLM:
        """Load an RL model with its base.

        - `from_pretrained(rl, base_model=base)`: `base` is a hub id / path (loaded with the same `kwargs`, plus
          `base_model_kwargs`) or a loaded model (used as is).
        - `from_pretrained(saved_pair_dir)`: a folder written by `save_pretrained` restores the pair (its base from
          the recorded path, or from the `base/` subfolder written by `save_pretrained(..., save_base=True)`).
        - `from_pretrained(lora_adapter_dir)`: a folder with `adapter_config.json`; its base is loaded once (from
          the adapter config, or `base_model=`) and serves both distributions.
        Usual `from_pretrained` kwargs (`dtype`, `device_map`, ...) reach both models. `check_tokenizers=False`
        skips the check that both checkpoints ship the same tokenizer (a checkpoint without tokenizer files is
        never compared).
        """
        path = pretrained_model_name_or_path
        saved = read_pair_record(path) if _is_dir_with(path, CONFIG_NAME) else None
        saved_vocab = None
        if saved is not None:
            if extrapolation_config is None:
                extrapolation_config = ExtrapolationConfig.from_dict(saved["extrapolation_config"])
            if base_model is None:
                base_model = _recorded_base(path, saved)
            lora_strategy = saved.get("lora_strategy", lora_strategy) if lora_strategy == "auto" else lora_strategy
            saved_vocab = saved.get("vocab_size")

        if _is_dir_with(path, ADAPTER_CONFIG_NAME):
            from peft import PeftConfig, PeftModel

            peft_cfg = PeftConfig.from_pretrained(path)
            base_src = base_model if base_model is not None else peft_cfg.base_model_name_or_path
            if not base_src:
                raise ValueError(f"{path}/{ADAPTER_CONFIG_NAME} names no base model; pass `base_model=`.")
            base = cls._load(base_src, kwargs, base_model_kwargs)
            peft_model = PeftModel.from_pretrained(base, path).eval()
            model = cls.from_peft(peft_model, extrapolation_config, lora_strategy=lora_strategy)
            model.tokenizer = load_tokenizer_files(path)
            return model

        if base_model is None:
            raise ValueError(
                f"`base_model` is required to load {path!s}: pass the base checkpoint (hub id, path or loaded model), "
                f"or load a folder written by `save_pretrained` (it has {CONFIG_NAME}) or a LoRA adapter folder."
            )
        rl_tok = load_tokenizer_files(path)
        vocab_size = saved_vocab
        if check_tokenizers and isinstance(base_model, (str, os.PathLike)) and rl_tok is not None:
            size = _compare_tokenizers(path, rl_tok, base_model, load_tokenizer_files(base_model))
            vocab_size = size if size is not None else vocab_size
        rl = AutoModelForCausalLM.from_pretrained(path, *model_args, **kwargs)
        base = cls._load(base_model, kwargs, base_model_kwargs)
        name = _absolute(base_model) if isinstance(base_model, (str, os.PathLike)) else None
        model = cls(
            rl, base, extrapolation_config, lora_strategy=lora_strategy, base_model_name_or_path=name,
            vocab_size=vocab_size,
        )
        model.tokenizer = rl_tok
        return model

    @staticmethod
    def _load(source: Any, kwargs: dict, extra: dict | None) -> Any:
        if isinstance(source, (str, os.PathLike)):
            return AutoModelForCausalLM.from_pretrained(source, **{**kwargs, **(extra or {})})
        return source

    @classmethod
    def from_peft(
        cls, peft_model: Any, extrapolation_config: ExtrapolationConfig | None = None, *, lora_strategy: str = "auto"
    ) -> DirectionalModelForCausalLM:
        """Pair a loaded PEFT model with its own base (the same weights, adapter off)."""
        check_pairable(peft_model)
        cfg = next(iter(peft_model.peft_config.values()))
        return cls(
            peft_model, None, extrapolation_config, lora_strategy=lora_strategy,
            base_model_name_or_path=getattr(cfg, "base_model_name_or_path", None),
        )

    @classmethod
    def from_models(
        cls, rl_model: Any, base_model: Any, extrapolation_config: ExtrapolationConfig | None = None, *,
        tokenizer: Any = None, **kwargs: Any,
    ) -> DirectionalModelForCausalLM:
        """Pair two loaded models (neither is modified). `tokenizer` (optional) is saved with the pair and sets
        `vocab_size` unless given."""
        if tokenizer is not None and kwargs.get("vocab_size") is None:
            kwargs["vocab_size"] = len(tokenizer)
        model = cls(rl_model, base_model, extrapolation_config, **kwargs)
        model.tokenizer = tokenizer
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, *, save_base: bool = False, **kwargs: Any) -> None:
        """Write the RL weights (or the LoRA adapter), its tokenizer when known, and `extrapolation_config.json`.

        The base weights are not written: the base's path or hub id is recorded (absolute for a local folder).
        When there is none to record (a base built in memory), pass `save_base=True` to write the base weights
        into `save_directory/base`, which `from_pretrained(save_directory)` then loads.
        """
        base_name = self.base_model_name_or_path
        if save_base and self.is_lora_pair:
            raise ValueError("`save_base=True` is for two separate models; a LoRA pair's base is its adapter's base "
                             "(save it with `peft_model.get_base_model().save_pretrained(...)` before adapting).")
        if not save_base and not base_name:
            raise ValueError(
                f"Cannot save the pair to {save_directory}: the base model has no name or path to record (it was "
                "built in memory). Pass `save_base=True` to write its weights into the pair folder, or "
                "`base_model_name_or_path=` when building the pair."
            )
        os.makedirs(save_directory, exist_ok=True)
        self.rl_model.save_pretrained(save_directory, **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)
        if save_base:
            self._reference_model.save_pretrained(os.path.join(save_directory, BASE_SUBFOLDER), **kwargs)
            base_name = None
        record = {
            "base_model_name_or_path": _absolute(base_name) if base_name else None,
            "base_model_subfolder": BASE_SUBFOLDER if save_base else None,
            "extrapolation_config": self.extrapolation_config.to_dict(),
            "hf_extrapolate_version": __version__,
            "lora_pair": self.is_lora_pair,
            "lora_strategy": self.lora_strategy,
            "tokenizer_size": len(self.tokenizer) if self.tokenizer is not None else None,
            # the compared token range: ids [0, vocab_size) (None: the common width of the two models' logits)
            "vocab_size": self.vocab_size,
        }
        with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, sort_keys=True)
            f.write("\n")

    # ------------------------------------------------------------------ generation
    def _resolve_generation_config(self, generation_config: GenerationConfig | None, kwargs: dict) -> GenerationConfig:
        """The settings this call resolves to (read only: decoding mode and warpers). `kwargs` is not changed."""
        gen = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        for key, value in kwargs.items():  # not `gen.update`: it validates, and would warn about flags it ignores
            if hasattr(gen, key) and (value is not None or key not in _FILLED_BY_DEFAULTS):
                setattr(gen, key, value)
        return gen

    def _strategy(self, gen: GenerationConfig, assistant: bool) -> str:
        if not self.is_lora_pair:
            return "separate"
        reason = fused_unsupported_reason(self.rl_model, num_beams=gen.num_beams or 1, assistant=assistant)
        if self.lora_strategy == "fused" and reason is not None:
            raise ValueError(f"lora_strategy='fused' is not possible here: {reason}. Use 'auto' or 'fallback'.")
        if self.lora_strategy == "fallback" or reason is not None:
            if reason is not None:
                logger.info("LoRA pair: using the fallback strategy because %s.", reason)
            return "fallback"
        return "fused"

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        extrapolation_config: ExtrapolationConfig | None = None,
        **kwargs: Any,
    ):
        """transformers' `generate` on the RL model with the directional processor; `extrapolation_config=`
        overrides the model's config for this call. Every other keyword means what it means to `generate` (None
        included: `eos_token_id=None` does not stop at EOS). Returns what `generate` returns; with
        `return_dict_in_generate=True` the output also carries `replace_ratio` (rows,),
        `replaced_token_probability` (rows, new tokens) and `lora_strategy` (the strategy that ran). `lookahead=k`
        drafts k tokens per round with the proposal model and checks them in one forward of the other
        (`hf_extrapolate.lookahead`; the same distribution)."""
        if kwargs.get("lookahead") is not None:
            return lookahead_generate(
                self, inputs, generation_config, logits_processor, extrapolation_config, **kwargs
            )
        kwargs.pop("lookahead", None)
        cfg = extrapolation_config if extrapolation_config is not None else self.extrapolation_config
        if not isinstance(cfg, ExtrapolationConfig):
            raise TypeError(f"`extrapolation_config` must be an ExtrapolationConfig, got {type(cfg).__name__}.")
        if generation_config is not None and not isinstance(generation_config, GenerationConfig):
            raise TypeError(f"`generation_config` must be a GenerationConfig, got {type(generation_config).__name__}.")
        gen = self._resolve_generation_config(generation_config, kwargs)
        for name, neutral in UNSUPPORTED_WARPERS.items():
            if getattr(gen, name, neutral) not in (neutral, None):
                raise ValueError(
                    f"`{name}` (={getattr(gen, name)}) is not supported with directional generation: only temperature, "
                    "top_k and top_p are applied inside each component (a setting that changes the RL scores but not "
                    "the base scores would shift the direction the method reads). Unset it."
                )
        do_sample = bool(gen.do_sample)
        num_beams = gen.num_beams or 1
        inner = {
            "temperature": float(gen.temperature) if do_sample and gen.temperature is not None else 1.0,
            "top_k": int(gen.top_k) if do_sample and gen.top_k else 0,
            "top_p": float(gen.top_p) if do_sample and gen.top_p is not None else 1.0,
        }
        cfg = cfg.replace(**inner)

        # without a mask the processor reads the one generate infers (transformers' rule), never a guess of ours
        attention_mask = kwargs.get("attention_mask")
        assistant = kwargs.get("assistant_model") is not None or gen.prompt_lookup_num_tokens is not None
        strategy = self._strategy(gen, assistant)
        if strategy == "separate":
            reference = ReferenceModel(self._reference_model, attention_mask, num_beams=num_beams)
        elif strategy == "fallback":
            layers = _tuner_layers(self.rl_model)
            reference = ReferenceModel(
                self.rl_model, attention_mask, num_beams=num_beams, forward_context=lambda: adapter_disabled(layers)
            )
        else:
            reference = FusedLoRAReference(self.rl_model)
        processor = DirectionalLogitsProcessor(
            reference, cfg, do_sample=do_sample, num_beams=num_beams, vocab_size=self.vocab_size,
        )
        processors = LogitsProcessorList(list(logits_processor or []) + [processor])

        # the warpers act inside, per component: the outer ones are neutral (sampling) or unset (greedy, so that
        # transformers does not warn about flags the user did not set); every other keyword reaches generate as given
        call_kwargs = {k: v for k, v in kwargs.items() if k not in INNER_WARPERS}
        neutral = {"temperature": 1.0, "top_k": 0, "top_p": 1.0} if do_sample else dict.fromkeys(INNER_WARPERS)
        if generation_config is not None:
            generation_config = copy.deepcopy(generation_config)
            for name, value in neutral.items():
                setattr(generation_config, name, value)
        defaults = copy.deepcopy(self.generation_config)
        defaults.do_sample = do_sample  # so that neutral sampling flags are not flagged against a greedy default
        for name, value in neutral.items():
            setattr(defaults, name, value)
        context = reference.fused_forward() if strategy == "fused" else contextlib.nullcontext()
        with context, _generation_defaults(self.rl_model, defaults):
            out = self.rl_model.generate(
                inputs, generation_config=generation_config, logits_processor=processors, **call_kwargs
            )
        self.last_processor = processor
        self.last_lora_strategy = strategy
        rows = processor.stats.mass.shape[0] if processor.stats.mass is not None else None
        sequences = getattr(out, "sequences", out)
        if strategy == "fused" and not isinstance(out, torch.Tensor):
            _drop_base_rows(out, sequences.shape[0])
        rows_match = rows is not None and sequences.shape[0] == rows
        ratio = processor.replace_ratio(sequences if rows_match else None)
        self.last_replace_ratio = ratio
        if not isinstance(out, torch.Tensor):
            out["replace_ratio"] = ratio
            out["lora_strategy"] = strategy
            if rows_match:
                out["replaced_token_probability"] = processor.replaced_token_probability(sequences)
        return out


@contextlib.contextmanager
def _generation_defaults(model: Any, defaults: GenerationConfig):
    """Make `defaults` the model's generation config for one call (generate fills unset values from it), restored
    in `finally`: the wrapper's defaults apply without passing a config object next to the user's keywords."""
    models = [model]
    if hasattr(model, "get_base_model"):  # PEFT: generate runs on the wrapped transformers model
        models.append(model.get_base_model())
    previous = [m.generation_config for m in models]
    try:
        for m in models:
            m.generation_config = defaults
        yield
    finally:
        for m, was in zip(models, previous):
            m.generation_config = was


def _drop_base_rows(out: Any, rows: int) -> None:
    """The fused LoRA forward runs 2R rows; give back only the R rows of the RL model (cache, hidden states, ...)."""
    cache = output_cache(out)
    if cache is not None and hasattr(cache, "batch_select_indices") and cache.get_seq_length() > 0:
        first = cache.layers[0].keys if hasattr(cache, "layers") else None
        if first is None or first.shape[0] == 2 * rows:
            cache.batch_select_indices(torch.arange(rows, device=first.device if first is not None else None))
    for key in ("hidden_states", "attentions"):
        value = out.get(key)
        if value is not None:
            out[key] = _slice_rows(value, rows)


def _slice_rows(value: Any, rows: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[:rows] if value.dim() >= 1 and value.shape[0] == 2 * rows else value
    if isinstance(value, (tuple, list)):
        return type(value)(_slice_rows(v, rows) for v in value)
    return value


# files one of which a tokenizer folder has; transformers 5 returns an empty stand-in tokenizer for some model types
# (qwen2: length 1, gemma3: length 5) when a folder has none, so a tokenizer counts only when its files are there
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.tiktoken")
BASE_SUBFOLDER = "base"


def _absolute(name: Any) -> str:
    """A local folder as an absolute path (a hub id unchanged)."""
    return os.path.abspath(name) if os.path.isdir(name) else str(name)


def has_tokenizer_files(source: Any) -> bool:
    """Whether `source` (a local folder or a hub id in the local cache / on the hub) ships tokenizer files."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    if os.path.isdir(source):
        return any(os.path.isfile(os.path.join(source, name)) for name in TOKENIZER_FILES)
    from transformers.utils import cached_file

    for name in TOKENIZER_FILES:
        try:
            if cached_file(str(source), name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False) is not None:
                return True
        except (OSError, ValueError):
            return False
    return False


def load_tokenizer_files(source: Any) -> Any | None:
    """The tokenizer `source` ships, or None when it has no tokenizer files or they do not load."""
    if not has_tokenizer_files(source):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        logger.info("No tokenizer loaded from %s (%s).", source, err)
        return None


def _compare_tokenizers(rl_path: Any, rl_tok: Any, base_path: Any, base_tok: Any) -> int | None:
    if rl_tok is None or base_tok is None:
        logger.info("Tokenizer check skipped: %s has no tokenizer files.", rl_path if rl_tok is None else base_path)
        return len(rl_tok) if rl_tok is not None else None
    if rl_tok.get_vocab() != base_tok.get_vocab():
        raise ValueError(
            f"The RL model ({rl_path}) and the base model ({base_path}) ship different tokenizers; the method compares "
            "token log-probs and needs one tokenizer for both. Pass the base the RL model was trained from, or "
            "`check_tokenizers=False` if you are sure the ids mean the same tokens."
        )
    return len(rl_tok)


def check_same_tokenizer(rl_path: Any, base_path: Any) -> int | None:
    """Raise `ValueError` when both checkpoints ship tokenizers and they differ; return the tokenizer's size
    (None when neither ships one). A checkpoint without tokenizer files is not compared."""
    return _compare_tokenizers(rl_path, load_tokenizer_files(rl_path), base_path, load_tokenizer_files(base_path))


def read_pair_record(path: Any) -> dict:
    """The `extrapolation_config.json` of a saved pair, with errors naming the file and the fix."""
    file = os.path.join(path, CONFIG_NAME)
    try:
        with open(file, encoding="utf-8") as f:
            record = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err.msg}, line {err.lineno}): re-save the pair with "
                         "`save_pretrained`.") from None
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not UTF-8 text: re-save the pair with `save_pretrained`.") from None
    if not isinstance(record, dict) or not isinstance(record.get("extrapolation_config"), dict):
        raise ValueError(f"{file} has no 'extrapolation_config' object: it was not written by `save_pretrained`; "
                         "re-save the pair, or pass `extrapolation_config=` and `base_model=`.")
    return record


def _recorded_base(path: Any, record: dict) -> str | None:
    """The base a saved pair names: its `base/` subfolder, or the recorded folder / hub id (checked to exist)."""
    file = os.path.join(path, CONFIG_NAME)
    sub = record.get("base_model_subfolder")
    if sub:
        folder = os.path.join(path, sub)
        if not os.path.isdir(folder):
            raise ValueError(f"{file} names the base subfolder {sub!r}, which is missing from {path}: "
                             "copy the whole pair folder, or pass `base_model=`.")
        return folder
    name = record.get("base_model_name_or_path")
    if not name:
        if record.get("lora_pair"):
            return None  # the adapter config names it
        raise ValueError(f"{file} records no base model: pass `base_model=` (the base checkpoint) when loading.")
    if os.path.isabs(name) and not os.path.isdir(name):
        raise ValueError(f"{file}: the base model folder {name} does not exist (moved?): pass `base_model=` with "
                         "its new location.")
    return name
