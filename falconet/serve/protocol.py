"""Request bodies of the OpenAI API (completions, chat completions, tokenize), as pydantic models.

Pydantic checks the JSON types; the meaning of the values (ranges, combinations) is checked
once, by `SamplingParams`, so that the server and the library accept exactly the same requests.
Bounds here only keep values inside what the engine can represent (a seed fits torch's
generator, a top-k fits a tensor, logits stay finite), so that no request can crash an engine
step.

Beyond OpenAI's fields, requests take the engine's own sampling controls the way vLLM accepts
them (`top_k`, `min_p`, `repetition_penalty`, `stop_token_ids`, `ignore_eos`, ...), and two
extension fields: `speculative` names a speculative-decoding method and `decoding_strategy` a
decoding strategy, each looked up in `falconet.methods.registry` (unknown names are a 400 that
lists the valid ones). Unknown fields are ignored, as by OpenAI and vLLM.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from falconet.errors import FalconetError
from falconet.sampling_params import SamplingParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_SAMPLES = 128  # n and best_of: each sample is a sequence in the engine
MAX_LOGPROBS = 20  # as OpenAI (top_logprobs) and vLLM

Count = Annotated[int, Field(ge=1, le=MAX_SAMPLES)]
# Bias and penalty values past these overflow float32 logits, and NaN probabilities would fail
# the whole engine step (every request in the batch), not just this one.
Bias = Annotated[float, Field(ge=-100, le=100)]  # OpenAI's documented range


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingRequest(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None  # None: the served model
    n: Count = 1
    temperature: float | None = None  # None: 1.0, as OpenAI
    top_p: float | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Bias] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # The engine's own controls, as vLLM's extra fields.
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float | None = None
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT64_MAX)]] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Extension: choose a method by name (see falconet.methods.registry).
    speculative: str | None = None
    num_speculative_tokens: int | None = Field(None, ge=0, le=16)
    decoding_strategy: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int, logprobs: int | None, best_of: int | None = None):
        """The engine's SamplingParams; FalconetError (a 400) when a value is out of range."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            n=self.n,
            best_of=best_of,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=self.logit_bias,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids or [],
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            speculative=self.speculative,
            num_speculative_tokens=self.num_speculative_tokens,
        )

    def error_param(self, error: FalconetError) -> str | None:
        """The request field an engine error is about: its messages start with the field's name."""
        first = str(error).split(" ", 1)[0]
        return first if first in type(self).model_fields else None


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingRequest):
    prompt: Prompt
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: Count | None = None
    suffix: str | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    # "developer" is OpenAI's newer name for "system".
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    add_generation_prompt: bool = True  # vLLM's extra: end with the assistant turn's header


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt, or a conversation rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]
