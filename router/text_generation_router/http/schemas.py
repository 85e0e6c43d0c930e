"""Request and response bodies of the HTTP API, with TGI's field names and meanings.

TGI's own routes (``/generate``, ``/generate_stream``, ``/``, ``/tokenize``,
``/info``) and the OpenAI-compatible ones (``/v1/chat/completions``,
``/v1/completions``, ``/v1/models``). Every optional field may be sent as
``null`` (TGI's clients send every field); unknown fields are ignored, as
TGI's server does. The models also make the OpenAPI document.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- TGI ------------------------------------------------------------------------------------


class GenerateParameters(_Body):
    """TGI's generation parameters; sampling is on when do_sample or any of its warpers is set."""

    best_of: int | None = Field(None, description="Generate best_of sequences and return the one with the highest log probability (sampling only)")
    decoder_input_details: bool = Field(False, description="Return the prompt tokens with their log probabilities")
    details: bool = Field(False, description="Return the generated tokens, the finish reason and the seed")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding")
    frequency_penalty: float | None = Field(None, description="Not supported: leave unset or 0")
    grammar: Any | None = Field(None, description="Not supported: leave unset")
    max_new_tokens: int | None = Field(None, description="Tokens to generate at most (default: the server's --default-max-new-tokens)")
    repetition_penalty: float | None = Field(None, description="Penalty for repeated tokens, 1.0 meaning none")
    return_full_text: bool | None = Field(None, description="Put the prompt before the generated text")
    seed: int | None = Field(None, description="Random seed for sampling")
    stop: list[str] = Field(default_factory=list, description="Stop generating when one of these texts appears")
    temperature: float | None = Field(None, description="Sampling temperature (> 0)")
    top_k: int | None = Field(None, description="Sample among the k most likely tokens")
    top_n_tokens: int | None = Field(None, description="Also return the n most likely tokens at each step")
    top_p: float | None = Field(None, description="Nucleus sampling: the smallest set of tokens whose probability reaches top_p")
    truncate: int | None = Field(None, description="Keep only the last N tokens of the prompt")
    typical_p: float | None = Field(None, description="Typical decoding mass")
    watermark: bool = Field(False, description="Not supported: leave false")
    adapter_id: str | None = Field(None, description="Not supported: this server serves one model without adapters")


class GenerateRequest(_Body):
    inputs: str = Field(..., description="The prompt", examples=["My name is Olivier and I"])
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)


class CompatGenerateRequest(GenerateRequest):
    """``POST /``: /generate, or /generate_stream when ``stream`` is true."""

    stream: bool = False


class InputToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool


FinishReason = Literal["length", "eos_token", "stop_sequence"]


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[InputToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] = Field(default_factory=list)


class Details(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[InputToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] = Field(default_factory=list)
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int


class StreamResponse(BaseModel):
    """One server-sent event of /generate_stream; the last carries generated_text and details."""

    index: int
    token: Token
    top_tokens: list[Token] = Field(default_factory=list)
    generated_text: str | None = None
    details: StreamDetails | None = None


class TokenizeRequest(_Body):
    inputs: str
    add_special_tokens: bool = True
    parameters: GenerateParameters | None = None


class SimpleToken(BaseModel):
    id: int
    text: str
    start: int
    stop: int


class Info(BaseModel):
    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str | None = "text-generation"
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None = None
    docker_label: str | None = None


class ErrorResponse(BaseModel):
    error: str
    error_type: str


# ---- OpenAI ---------------------------------------------------------------------------------


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: Any | None = None
    tool_call_id: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _OpenAIRequest(_Body):
    """The fields OpenAI's chat and completion requests share."""

    model: str | None = Field(None, description="Any name: this server serves one model")
    max_tokens: int | None = None
    temperature: float | None = Field(None, description="0 means greedy; default 1.0 (sampling)")
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: Any | None = None
    user: str | None = None


class ChatRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: Any | None = None
    tool_choice: Any | None = None
    response_format: Any | None = None


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str]
    max_tokens: int | None = Field(None, description="Tokens to generate at most (default 16, as OpenAI's)")
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="Prompt tokens whose keys and values came from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprob]


class OutputMessage(BaseModel):
    role: str = "assistant"
    content: str
    tool_calls: Any | None = None


class ChatChoice(BaseModel):
    index: int
    message: OutputMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str


class Completion(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
