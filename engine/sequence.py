"""One request inside an engine: its tokens, its blocks and how far its KV has been computed."""

from __future__ import annotations

import enum

import torch

from core.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Counters, not phases (as in vLLM v1)::

        token_ids:  | prompt ........................ | output ......... |
                    0              num_computed_tokens                   num_tokens
                    |<-- KV in cache -->|<-- still to compute -->|

    A sequence is prefilling while ``num_computed_tokens < num_tokens - 1`` and decoding once only
    the newest token is missing from the cache. Preemption (recompute) just resets
    ``num_computed_tokens`` to 0 and drops the blocks; prompt and output tokens are kept.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        arrival_time: float = 0.0,
    ):
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.arrival_time = arrival_time
        self.status = SequenceStatus.WAITING
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_prompt_tokens = 0  # prefix-cache hit at first admission
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self._generator: torch.Generator | None = None
        self.grammar = None  # structured output: an engine.structured GrammarState once admitted
        # speculative decoding
        self.draft_computed = 0  # tokens whose draft-model KV is valid
        self.spec_proposed = 0
        self.spec_accepted = 0
        self.spec_disabled = False  # acceptance too low to pay: plain decode from now on
        self.output_logprobs: list = []
        self.prompt_logprobs: list = []

    # RNG streams of a seeded request, so that each use draws independent numbers
    RNG_SAMPLE, RNG_VERIFY, RNG_DRAFT = 0, 1, 2

    def generator(
        self, offset: int = 0, stream: int = RNG_SAMPLE, device: torch.device | str = "cpu"
    ) -> torch.Generator | None:
        """RNG on ``device`` (that of the tensors it will fill: a CUDA kernel refuses a CPU
        generator) for output position ``num_output_tokens + offset`` of a seeded request (None
        if unseeded), keyed by (seed, stream, position).

        Keyed by position rather than carried along, so a seeded request samples the same
        tokens whatever batch it is in, after a preemption, and when its first token comes
        from a prefill worker and the rest from a decode worker. Only ints are hashed: a str
        would hash differently in every process (PYTHONHASHSEED).
        """
        if self.params.seed is None:
            return None
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # what a CUDA tensor's .device says
            device = torch.device("cuda", torch.cuda.current_device())
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        key = hash((self.params.seed, stream, self.num_output_tokens + offset))
        return self._generator.manual_seed(key)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def num_blocks_for(self, num_tokens: int, block_size: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens minus those already held."""
        return max(0, -(-num_tokens // block_size) - len(self.block_ids))

    def check_stop_token(self, token_id: int) -> bool:
        """Apply max_tokens / eos / stop_token_ids after ``token_id`` was appended."""
        p = self.params
        if self.num_output_tokens >= p.min_tokens:
            if token_id in p.stop_token_ids:
                self.finish_reason, self.stop_reason = "stop", token_id
                return True
            if not p.ignore_eos and token_id in self.eos_token_ids:
                self.finish_reason = "stop"
                return True
        if self.num_output_tokens >= p.max_tokens:
            self.finish_reason = "length"
            return True
        return False
