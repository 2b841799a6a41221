"""hf_extrapolate: the direction of RLVR updates, exploited inside transformers' `generate()`.

Implements "On the Direction of RLVR Updates for LLM Reasoning: Identification and Exploitation" (ICLR 2026:
"Beyond Magnitude: Leveraging Direction of RLVR Updates for LLM Reasoning").
"""

from .config import CRITERIA, PRESETS, PROPOSALS, ExtrapolationConfig
from .directional import directional_logprobs, directional_step
from .modeling import DirectionalModelForCausalLM
from .processor import DirectionalLogitsProcessor
from .reference import ReferenceModel
from .version import __version__

__all__ = [
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
