"""Per-request sampling parameters, validated at construction (errors name the field)."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.structured_output import StructuredOutput


@dataclass(frozen=True)
class SamplingParams:
    """What to generate and when to stop. Plain data: msgpack-able through ``to_dict``.

    ``temperature == 0`` means greedy. ``top_k == 0`` means no top-k cut. ``seed`` makes a
    sampled request reproducible regardless of what else is in the batch. ``logprobs`` is the
    number of top alternatives returned per generated token (None: no logprobs);
    ``prompt_logprobs`` likewise for prompt tokens. ``structured``: the grammar every output
    token must follow (None: free text).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured: StructuredOutput | None = None
    use_speculation: bool = True
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        # Normalise list inputs (JSON, msgpack) into tuples so the object stays hashable-ish.
        object.__setattr__(self, "stop", _as_tuple(self.stop, str, "stop"))
        object.__setattr__(
            self, "stop_token_ids", _as_tuple(self.stop_token_ids, int, "stop_token_ids")
        )
        if isinstance(self.structured, dict):  # from msgpack / a Ray worker spec
            object.__setattr__(self, "structured", StructuredOutput.from_dict(self.structured))
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise ValueError(f"structured must be a StructuredOutput, got {self.structured!r}")
        _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        _check_int("top_k", self.top_k, minimum=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens, got {self.min_tokens} > {self.max_tokens}"
            )
        _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _check_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_float("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        _check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_float(name, value)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, minimum=0, maximum=self.MAX_LOGPROBS)
        if self.seed is not None:
            _check_int("seed", self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"}
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        d["structured"] = None if self.structured is None else self.structured.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SamplingParams:
        return cls(**d)


def _check_int(name: str, value: object, minimum: int | None = None, maximum: int | None = None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def _check_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")


def _as_tuple(value: object, kind: type, name: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, kind):
        return (value,)
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, kind) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"{name} must be a {kind.__name__} or a list of them, got {value!r}")
    return tuple(value)
