"""`VllmEngine`: the evaluation runner's engine on vLLM, one `DirectionalLLM` serving every mode of a run.

`hf_extrapolate.evaluation.evaluate(None, None, tokenizer, problems, modes, settings, engine=VllmEngine(...))` (and
`hf-extrapolate eval / sweep --engine vllm`) writes the same records as the transformers engine. Each mode is a
per-request config (`SamplingParams.extra_args["extrapolation_config"]`), so one engine serves a whole evaluation or
sweep, and every pending mode of a batch of problems goes into one `generate` call:

- `base`: the base model's own distribution (proposal `base`, criterion `never`); `rl`: the RL model's (proposal
  `rl`, criterion `never`); a directional mode: its `ExtrapolationConfig`, complete (the engine's default is not used).
  Their records' replace ratio is 0 / 1 / the mean replaced mass, as with the transformers engine.
- Sampling: `temperature / top_p / top_k` as `SamplingParams` (DirectionalLLM applies them to each component inside
  the step), `n = num_samples`, `max_tokens = max_new_tokens`; a response ends at the run's end-of-sequence ids
  (`stop_token_ids`, `ignore_eos=True` so that vLLM adds none of its own). Temperature 0 is the two-stage greedy
  choice: the same tokens as the transformers engine.
- Seeds: prompt `j` of a unit gets `request_seed(unit seed, j)`, its `i`-th sample that `+ i` (vLLM's rule for `n`):
  reproducible, the same in every mode, independent of batching and scheduling. They are not the random numbers of
  the transformers engine, so sampled responses differ from that engine's (the records name the engine; a run resumes
  only with the engine that began it).

What it does not do: the `random` criterion under greedy decoding (its coin would come from the worker's unseeded
global generator, not from the request) is refused naming the mode; base and rl modes run both networks (the engine
holds both), so they cost what a directional mode costs; there is no data parallelism across processes (see
`hf_extrapolate.vllm.DirectionalLLM`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..config import ExtrapolationConfig
from ..evaluation.generation import GenerationSettings, Responses, UnitRequest, left_pad
from ..evaluation.modes import EvalMode

logger = logging.getLogger(__name__)

# the config a request carries for the two endpoint modes: exactly one model's (warped) distribution
ENDPOINT_CONFIGS = {
    "base": ExtrapolationConfig(proposal="base", criterion="never", gamma=0.0),
    "rl": ExtrapolationConfig(proposal="rl", criterion="never", gamma=0.0),
}
ENDPOINT_RATIOS = {"base": 0.0, "rl": 1.0}  # the transformers engine's convention for the endpoints


def request_seed(unit_seed: int, index: int) -> int:
    """The vLLM seed of prompt `index` of a unit seeded `unit_seed` (its samples use this `+ i`)."""
    return int(np.random.SeedSequence([unit_seed, index]).generate_state(1)[0])


def mode_config(mode: EvalMode) -> ExtrapolationConfig:
    """The per-request `ExtrapolationConfig` of an evaluation mode."""
    return ENDPOINT_CONFIGS[mode.kind] if mode.kind in ENDPOINT_CONFIGS else mode.config


def check_mode(mode: EvalMode, settings: GenerationSettings) -> None:
    """Raise `ValueError` naming `mode` if the vLLM engine cannot run it exactly."""
    if mode.kind == "directional" and mode.config.criterion == "random" and not settings.do_sample:
        raise ValueError(
            f"Mode {mode.name!r} cannot run on the vLLM engine: under greedy decoding the `random` criterion flips a "
            "coin per step from the worker's global generator, which no request seeds. Sample (temperature > 0: the "
            "step is then the exact mixture, no coin), or use the transformers engine."
        )


class VllmEngine:
    """The runner's engine on one `DirectionalLLM` (started on first use: a resumed run with nothing left to do
    starts no engine).

    Args:
        llm (`DirectionalLLM`, *optional*): a running engine; or
        start (`Callable[[], DirectionalLLM]`, *optional*): builds it when first needed.
        eos_sources: objects with `eos_token_id` / `generation_config.eos_token_id` (the two checkpoints' configs and
            generation configs) whose ids, with the tokenizer's, end a response (`evaluation.eos_token_ids`).
    """

    name = "vllm"
    serves_modes_together = True  # every pending mode of a batch of problems in one generate call

    def __init__(self, llm: Any = None, *, start: Callable[[], Any] | None = None, eos_sources: Sequence[Any] = ()):
        if (llm is None) == (start is None):
            raise ValueError("Pass a running DirectionalLLM as `llm` or a function that starts one as `start`.")
        self._llm, self._start = llm, start
        self.eos_sources = tuple(eos_sources)

    @property
    def llm(self) -> Any:
        if self._llm is None:
            logger.info("starting the vLLM engine")
            self._llm = self._start()
        return self._llm

    def check(self, modes: Sequence[EvalMode], settings: GenerationSettings) -> None:
        """Raise `ValueError` naming a mode this engine cannot run exactly (before anything is generated)."""
        for mode in modes:
            check_mode(mode, settings)

    def sampling_params(self, mode: EvalMode, settings: GenerationSettings, eos_token_id: Sequence[int],
                        seed: int | None) -> Any:
        from vllm import SamplingParams

        sampled = settings.do_sample
        return SamplingParams(
            n=settings.num_samples, max_tokens=settings.max_new_tokens,
            temperature=settings.temperature if sampled else 0.0,
            top_p=settings.top_p if sampled else 1.0, top_k=settings.top_k if sampled else 0,
            seed=seed if sampled else None, ignore_eos=True, stop_token_ids=list(eos_token_id), detokenize=False,
            extra_args={"extrapolation_config": mode_config(mode).to_dict()},
        )

    def generate(
        self, requests: Sequence[UnitRequest], settings: GenerationSettings, *, eos_token_id: Sequence[int],
        pad_token_id: int,
    ) -> list[Responses]:
        """One `DirectionalLLM.generate` call for all `requests`; one `Responses` per request (rows sample-major
        within a prompt, prompts left-padded, responses right-padded with `pad_token_id`)."""
        for request in requests:
            check_mode(request.mode, settings)
        prompts, params = [], []
        for request in requests:
            for j, ids in enumerate(request.prompts):
                prompts.append({"prompt_token_ids": list(ids)})
                params.append(self.sampling_params(request.mode, settings, eos_token_id,
                                                   request_seed(request.seed, j)))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results, start = [], 0
        for request in requests:
            mine = outputs[start : start + len(request.prompts)]
            start += len(request.prompts)
            completions = [c for out in mine for c in out.outputs]  # sample-major within a prompt
            results.append(_responses(request, completions, pad_token_id))
        return results


def _responses(request: UnitRequest, completions: list, pad_token_id: int) -> Responses:
    k = len(completions) // len(request.prompts)
    prompt_ids, _ = left_pad(request.prompts, pad_token_id)
    prompt_ids = prompt_ids.repeat_interleave(k, dim=0)
    lengths = [len(c.token_ids) for c in completions]
    width = max(lengths, default=0)
    response = torch.full((len(completions), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(completions), width), dtype=torch.bool)
    for row, completion in enumerate(completions):  # vLLM stops at the first end-of-sequence id (kept in the ids)
        response[row, : lengths[row]] = torch.as_tensor(list(completion.token_ids), dtype=torch.long)
        mask[row, : lengths[row]] = True
    kind = request.mode.kind
    if kind in ENDPOINT_RATIOS:
        ratio = torch.full((len(completions),), ENDPOINT_RATIOS[kind])
    else:
        ratio = torch.tensor([float(c.replace_ratio) for c in completions])
    return Responses(torch.cat([prompt_ids, response], dim=1), prompt_ids.shape[1], mask, ratio)
