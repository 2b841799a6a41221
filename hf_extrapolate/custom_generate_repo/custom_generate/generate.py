"""transformers' `custom_generate` entry point of hf_extrapolate: directional decoding on a plain model.

```python
from hf_extrapolate import CUSTOM_GENERATE_DIR
out = rl_model.generate(**inputs, custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True,
                        base_model=base_model, lookahead=8, do_sample=True, max_new_tokens=256)
```

transformers calls `generate(model=rl_model, **arguments of generate)`; this pairs `model` with `base_model` (or, for a
PEFT model without `base_model`, with its own adapter-off base) in a `DirectionalModelForCausalLM` and runs its
`generate`: with `lookahead=k` the lookahead decoder, with `lookahead=None` the step-by-step processor.
"""

from hf_extrapolate.lookahead import custom_generate_entry


def generate(model, base_model=None, extrapolation_config=None, lookahead=8, lora_strategy="auto", **kwargs):
    return custom_generate_entry(
        model, base_model=base_model, extrapolation_config=extrapolation_config, lookahead=lookahead,
        lora_strategy=lora_strategy, **kwargs,
    )
