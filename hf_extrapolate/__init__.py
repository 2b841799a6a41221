"""hf_extrapolate: the direction of RLVR updates, exploited inside transformers' `generate()`.

Implements "On the Direction of RLVR Updates for LLM Reasoning: Identification and Exploitation" (ICLR 2026:
"Beyond Magnitude: Leveraging Direction of RLVR Updates for LLM Reasoning").
"""

import os as _os

from .config import CRITERIA, PRESETS, PROPOSALS, ExtrapolationConfig
from .directional import directional_logprobs, directional_step
from .modeling import DirectionalModelForCausalLM
from .processor import DirectionalLogitsProcessor
from .reference import ReferenceModel
from .version import __version__

# a folder for transformers' `generate(custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True, base_model=...)`
CUSTOM_GENERATE_DIR = _os.path.join(_os.path.dirname(__file__), "custom_generate_repo")

__all__ = [
    "CUSTOM_GENERATE_DIR",
    "CRITERIA",
    "DirectionalLogitsProcessor",
    "DirectionalModelForCausalLM",
    "ReferenceModel",
    "PRESETS",
    "PROPOSALS",
    "ExtrapolationConfig",
    "directional_logprobs",
    "directional_step",
    "__version__",
]
