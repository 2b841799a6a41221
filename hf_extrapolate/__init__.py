"""hf_extrapolate: the direction of RLVR updates, exploited inside transformers' `generate()`.

Implements "On the Direction of RLVR Updates for LLM Reasoning: Identification and Exploitation" (ICLR 2026:
"Beyond Magnitude: Leveraging Direction of RLVR Updates for LLM Reasoning").
"""

from .config import CRITERIA, PROPOSALS, ExtrapolationConfig
from .directional import directional_logprobs, directional_step
from .processor import DirectionalLogitsProcessor
from .reference import ReferenceModel

__version__ = "0.1.0"

__all__ = [
    "CRITERIA",
    "DirectionalLogitsProcessor",
    "ReferenceModel",
    "PROPOSALS",
    "ExtrapolationConfig",
    "directional_logprobs",
    "directional_step",
    "__version__",
]
