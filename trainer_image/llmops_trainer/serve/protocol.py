"""The OpenAI request and response bodies the server speaks, and what a request means for
generation.

These models are the single source of the server's contract: FastAPI validates requests with
them and generates `/openapi.json` from them, so the document says exactly what is accepted.
Validation is strict (`"2"` or `true` is not an integer), unknown fields are refused with the
field's name (as OpenAI does), and the only fields a request may send but the server cannot
honour (`suffix`) accept nothing but null. Rules the JSON schema cannot express (at most one of
`n` and `best_of` greater than the other, `stream_options` only with `stream`, ...) answer 400,
which the document lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

MAX_STOPS = 4
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1
MIN_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # alternatives per position, as vLLM's default max_logprobs
MAX_N = 16  # choices per prompt (n, best_of)
MAX_PROMPTS = 64  # prompts per /v1/completions request
MAX_LOGIT_BIAS = 300  # entries, as OpenAI
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's and vLLM's default max_tokens for completions


class RequestError(ValueError):
    """A request the server cannot serve as asked: answered with `status` and the message.
    `reason` labels the rejection in `llmops_serving_requests_rejected_total`."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.reason = reason or {400: "invalid", 404: "not_found", 413: "too_large"}.get(
            status, "error" if status >= 500 else "invalid"
        )
        self.retry_after: float | None = None  # seconds, for 429


def _unicode(text: str) -> str:
    """JSON may escape a lone surrogate (`"\\ud800"`); no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"must be valid Unicode: lone surrogate {text[error.start]!r} at {error.start}"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
StopString = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(_unicode)
]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]
_BIAS_KEY = r"^[0-9]{1,10}$"
LogitBias = Annotated[
    dict[Annotated[str, StringConstraints(pattern=_BIAS_KEY)], Bias],
    Field(max_length=MAX_LOGIT_BIAS),
    WithJsonSchema(
        {
            "type": "object",
            "description": "Token id (as a string) -> bias added to its logit (-100..100).",
            "patternProperties": {_BIAS_KEY: {"type": "number", "minimum": -100, "maximum": 100}},
            "additionalProperties": False,
            "maxProperties": MAX_LOGIT_BIAS,
        }
    ),
]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # Log-probabilities of the model's distribution (before penalties, bias and temperature):
    # None for none, k for the chosen token's and the k likeliest alternatives'.
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for every prompt position (echo)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        # Dividing by a vanishing temperature overflows; it means greedy anyway (as in vLLM).
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=256, description="A name /v1/models lists.")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    # Not in OpenAI's schema; vLLM's extensions, sent with the client's `extra_body`.
    top_k: int | None = Field(default=None, ge=-1, description="0 or -1: no limit (vLLM's).")
    ignore_eos: bool = Field(default=False, description="Keep generating after end of text.")
    n: int | None = Field(default=None, ge=1, le=MAX_N, description="Choices per prompt.")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=MAX_SEED)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: LogitBias | None = None
    user: Annotated[str, StringConstraints(max_length=256), AfterValidator(_unicode)] | None = None

    @model_validator(mode="after")
    def _supported(self) -> _Common:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def choices(self) -> int:
        """Sequences generated per prompt."""
        return self.n or 1

    def bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(token), bias) for token, bias in (self.logit_bias or {}).items())

    def sampling(
        self,
        max_tokens: int,
        extra_stops: tuple[str, ...] = (),
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        choice: int = 0,
    ) -> SamplingParams:
        """The parameters of choice `choice` of a prompt: each choice draws from its own
        generator, seeded `seed + choice` (so choice 0 of a request with n=2 is the choice of
        the same request with n=1)."""
        top_k = self.top_k or 0
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(top_k, 0),
            seed=None if self.seed is None else (self.seed + choice) % 2**64,
            stop=self.stops() + extra_stops,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=self.bias(),
        )


Prompt = (
    Text
    | Annotated[list[TokenId], Field(description="One prompt as token ids.")]
    | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
    | Annotated[list[list[TokenId]], Field(min_length=1, max_length=MAX_PROMPTS)]
)


class CompletionRequest(_Common):
    """POST /v1/completions"""

    prompt: Prompt = Field(
        description="Text, token ids, or a list of either (one choice set per prompt)."
    )
    max_tokens: int | None = Field(
        default=None,
        ge=0,
        description=f"Tokens to generate (default {DEFAULT_COMPLETION_TOKENS}); 0 with echo "
        "scores the prompt only.",
    )
    echo: bool | None = Field(default=False, description="Return the prompt before the text.")
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Log-probabilities of the chosen tokens and of this many alternatives.",
    )
    best_of: int | None = Field(
        default=None,
        ge=1,
        le=MAX_N,
        description="Generate this many per prompt and return the n likeliest; not streamed.",
    )
    suffix: None = Field(default=None, description="Not supported: only null.")
    return_tokens_as_token_ids: bool | None = Field(
        default=None, description="vLLM's: logprobs name tokens `token_id:<id>`."
    )

    @model_validator(mode="after")
    def _completion_supported(self) -> CompletionRequest:
        if self.best_of is not None:
            if self.best_of < self.choices():
                raise ValueError("best_of: must be at least n")
            if self.stream and self.best_of > self.choices():
                raise ValueError("best_of: cannot be streamed when greater than n")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids; `[]` is one empty prompt."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        prompts: list[str | list[int]] = []
        for item in prompt:
            if isinstance(item, int):
                return [[int(t) for t in prompt if isinstance(t, int)]]
            prompts.append(item if isinstance(item, str) else list(item))
        return prompts or [[]]

    def generated(self) -> int:
        """Sequences generated per prompt (best_of of them, of which n are returned)."""
        return max(self.best_of or 1, self.choices())


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Annotated[str, StringConstraints(max_length=64), AfterValidator(_unicode)] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    """POST /v1/chat/completions"""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(
        default=None, ge=1, description="Deprecated by OpenAI for max_completion_tokens."
    )
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="Tokens to generate (default: what the context leaves)."
    )
    logprobs: bool | None = Field(default=False, description="Log-probabilities of the tokens.")
    top_logprobs: int | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS, description="Alternatives per token; needs logprobs."
    )

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs to be true")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# -- responses (documentation of what the handlers return) --------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]


class CompletionLogprobs(BaseModel):
    """The legacy completions shape; with echo the prompt's tokens come first (the very first
    has no log-probability)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion; with `include_usage` the last has no
    choices and the usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion; with `include_usage` the last has
    no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def field_names(*models: type[BaseModel]) -> frozenset[str]:
    """Every field name of these models and the models nested in them: what an error's
    `param` may consist of (besides list indices)."""
    names: set[str] = set()
    seen: set[type[BaseModel]] = set()
    todo = list(models)
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            names.add(info.alias or name)
            todo.extend(_models_in(info.annotation))
    return frozenset(names)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]
