"""The model behind the server: load a model directory, turn prompts into token ids, stream completions.

`Backend.load(directory)` reads a Forgather model directory (its generated code, through transformers'
remote-code loading, which also gives `device_map="auto"` sharding) or a Hugging Face Llama-family
directory, plus the tokenizer saved beside it. Both kinds answer the same call, `model(input_ids,
past_key_values, use_cache=True)`, so one decoding loop serves both: prefill the prompt once, then one
token per step on the KV cache. `Backend.stream(prompt_ids, params)` yields `Delta`s of text as tokens
arrive, holding back text that might still turn into a stop string; the last one carries `finish_reason`.
This loop serves one request at a time (the app runs it on one worker thread; requests queue). With
`engine=True` the backend also starts an `Engine` (engine.py): continuous batching over a static KV cache,
CUDA graphs on a GPU; the app then sends every request there, and `text_stream` turns its tokens into text.
The
tokenizer is shared with the request handlers, which encode prompts meanwhile, so every use of it holds a
lock (a Rust fast tokenizer raises "Already borrowed" when one thread reconfigures it while another decodes).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .scheduler import SHUTTING_DOWN, EngineStopped
from .text import Delta, TextStream

# The documented default chat template (ChatML) for tokenizers that bring none.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_CHAT_STOP = "<|im_end|>"
DEFAULT_CONTEXT = 2048  # when neither the config nor the tokenizer names a context length
ENGINE_CONTEXT = 8192  # the engine's cache slots hold this many tokens unless context_length says otherwise


class RequestError(ValueError):
    """A request the model cannot serve (too long, bad parameters); becomes a 400 with an OpenAI error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


# Sampling divides the logits by the temperature and keeps the nucleus of mass top_p, both in float32: a
# temperature below ~1e-38 makes the logits infinite and a top_p below float32's range (1e-300) rounds to 0 and
# keeps no token, and either leaves no valid distribution. Such values mean "the most probable token": a
# temperature below 1e-5 is greedy (as vLLM's _SAMPLING_EPS), and top_p is at least 1e-6, which float32 holds
# and which keeps the most probable token (alone, unless a million tokens share the mass).
GREEDY_BELOW_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-6


@dataclasses.dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < GREEDY_BELOW_TEMPERATURE:
            self.temperature = 0.0
        self.top_p = max(self.top_p, MIN_TOP_P)


def _torch_dtype(name: str) -> Any:
    if name == "auto":
        return "auto"
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype {name!r}; use auto, float32, bfloat16 or float16")
    return dtype


def _context_length(config: Any, tokenizer: Any, override: int | None) -> int:
    if override:
        return override
    length = getattr(config, "max_position_embeddings", None)
    tokenizer_length = getattr(tokenizer, "model_max_length", None)
    if not length and tokenizer_length and tokenizer_length < 10**7:  # transformers' "no limit" is ~1e30
        length = tokenizer_length
    return int(length or DEFAULT_CONTEXT)


def _stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokenizer's end-of-sequence id and the generation config's (which may list several)."""
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    return {token for token in (tokenizer.eos_token_id, *listed) if token is not None}


class ChatTemplateError(ValueError):
    """A chat template that does not compile, or fails on a conversation of one user message."""


def check_chat_template(tokenizer: Any, template: str) -> None:
    """ChatTemplateError unless `template` compiles and renders a conversation of one user message with
    `tokenizer`, as every chat request renders it: a broken template is refused when the server starts, not
    blamed on each request. The message is Jinja's, after the template's line where Jinja tells it."""
    from jinja2 import TemplateSyntaxError

    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], chat_template=template,
                                      add_generation_prompt=True, tokenize=False)
    except TemplateSyntaxError as error:
        raise ChatTemplateError(f"line {error.lineno}: {error.message}") from None
    except Exception as error:  # the template raised, called what is not there, ...: it fails every request
        trace, lines = error.__traceback__, []
        while trace is not None:  # Jinja's frames of the template carry its line numbers
            if trace.tb_frame.f_code.co_filename == "<template>":
                lines.append(trace.tb_lineno)
            trace = trace.tb_next
        where = f"line {lines[-1]}: " if lines else ""
        raise ChatTemplateError(f"{where}rendering a conversation of one user message failed: "
                                f"{type(error).__name__}: {error}") from None


def _longest_token(tokenizer: Any) -> int:
    """The most characters one token of the vocabulary stands for: its text decoded alone, plus one for the
    leading space that decoding a lone SentencePiece token drops. A text of more characters than the context
    length times this has more tokens than the context holds, where the tokenizer encodes every character
    (byte-level BPE, SentencePiece), and is refused without encoding it (one that drops whitespace could fit
    such a text of mostly spaces: it is refused all the same). Once at startup: ~1 s for 128k tokens."""
    texts = tokenizer.batch_decode([[token] for token in range(len(tokenizer))], skip_special_tokens=False)
    return max(map(len, texts), default=0) + 1


class Backend:
    """A loaded model and tokenizer. Args: `context_length` bounds prompt + completion tokens."""

    def __init__(self, model: Any, tokenizer: Any, context_length: int, stop_token_ids: set[int],
                 chat_template: str | None = None, stop_strings: Sequence[str] = ()):
        """`chat_template` (Jinja text) replaces the tokenizer's; `stop_strings` end every request's text, beside
        the request's own stop strings."""
        self.model, self.tokenizer = model, tokenizer
        self.tokenizer_lock = threading.Lock()
        self.context_length = context_length
        self.longest_token = _longest_token(tokenizer)
        self.stop_token_ids = stop_token_ids
        self.engine: Any = None  # an Engine once start_engine() ran
        self.stopping = threading.Event()  # set by close(): the simple loop stops, as the engine does
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.chat_stop: tuple[str, ...] = ()
        if chat_template is not None:
            check_chat_template(tokenizer, chat_template)
            tokenizer.chat_template = chat_template
        elif getattr(tokenizer, "chat_template", None) is None:
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
            self.chat_stop = (DEFAULT_CHAT_STOP,)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        device_map: str | None = None,
        dtype: str = "auto",
        compile: bool = False,
        context_length: int | None = None,
        max_memory: dict | None = None,
        engine: bool = False,
        max_num_seqs: int = 8,
        chat_template: str | None = None,
        stop_strings: Sequence[str] = (),
    ) -> "Backend":
        """Load a model directory. Without `device_map` the model goes to the first GPU, or the CPU;
        `device_map="auto"` spreads it over the visible GPUs (accelerate; `max_memory` caps each device,
        {0: "20GiB", 1: ...}), or keeps it on the CPU. `engine` starts the batching engine with
        `max_num_seqs` slots (which compiles its decode step on a GPU anyway; `compile` then also compiles the
        model's own step where the engine's fused one does not apply). `chat_template`, `stop_strings`: see
        the constructor; a chat template that fails (ChatTemplateError) is refused before the model loads."""
        from safetensors import SafetensorError
        from transformers import AutoModelForCausalLM

        from forgather.convert.directory import is_forgather_directory
        from forgather.convert.vocab import load_tokenizer

        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{directory} is not a model directory (no config.json)")
        tokenizer = load_tokenizer(directory)
        if chat_template is not None:
            check_chat_template(tokenizer, chat_template)
        forgather = is_forgather_directory(directory)
        if forgather and device_map == "auto":
            from .placement import forgather_device_map

            device_map = forgather_device_map(str(directory), max_memory, _torch_dtype(dtype))
        # Forgather directories carry their own generated code; Hugging Face ones need none.
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(directory), trust_remote_code=forgather, dtype=_torch_dtype(dtype), device_map=device_map,
                max_memory=max_memory,
            )
        except (OSError, SafetensorError) as error:  # a file missing (weights, the model's code) or cut short
            from forgather.errors import UserError

            reason = str(error).splitlines()[0].split(" Checkout 'https://huggingface.co/")[0]  # not a hub id
            raise UserError(f"{directory}: the model does not load ({reason}); give a complete "
                            f"model directory, as a run's export or `forgather convert` writes it") from error
        if device_map is None:
            model.to("cuda" if torch.cuda.is_available() else "cpu")
        elif forgather:
            from .placement import align_forgather_devices

            align_forgather_devices(model)
        model.eval()
        if compile and not engine:
            model.forward = torch.compile(model.forward, dynamic=True)
        length = _context_length(model.config, tokenizer, context_length)
        if engine and context_length is None:
            length = min(length, ENGINE_CONTEXT)
        backend = cls(model, tokenizer, length, _stop_token_ids(model, tokenizer), chat_template, stop_strings)
        if len(tokenizer) > backend.vocab_size:
            warnings.warn(f"{directory}: its tokenizer has {len(tokenizer)} tokens, its model only {backend.vocab_size}"
                          f" embedding rows: prompts holding the tokens beyond them are refused; is the tokenizer "
                          f"this model's?", stacklevel=2)
        if engine:
            backend.start_engine(max_num_seqs, compile=True if compile else None)  # None: the engine's default
        return backend

    def start_engine(self, slots: int, **options: Any) -> None:
        """Serve through an Engine with `slots` cache slots of `context_length` tokens (options: Engine's).
        A model the engine cannot run is served by the simple loop, with a warning saying why."""
        from .engine import Engine, UnsupportedModel

        try:
            self.engine = Engine(self.model, self.stop_token_ids, slots, self.context_length, **options)
        except UnsupportedModel as error:
            warnings.warn(f"serving one request at a time: the batching engine cannot run this model ({error})",
                          stacklevel=2)

    def close(self) -> None:
        """The server is shutting down: every completion still running or queued ends with EngineStopped, in the
        engine and in the simple loop alike, and later ones are refused with it."""
        self.stopping.set()
        if self.engine is not None:
            self.engine.close()

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    # --- prompts -----------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The token ids of `text`; RequestError for a token the model has no embedding row for (a tokenizer
        larger than the model's vocabulary): on a GPU such an id is a device-side assert that breaks every later
        request, so it never reaches the model."""
        with self.tokenizer_lock:
            ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        beyond = [token for token in ids if token >= self.vocab_size]
        if beyond:
            raise RequestError(
                f"the prompt's token {beyond[0]} ({self.decode([beyond[0]])!r}) has no embedding in this model, whose "
                f"vocabulary has {self.vocab_size} tokens (its tokenizer has {len(self.tokenizer)}): the server's "
                f"model directory holds another model's tokenizer; avoid that text, or fix the directory")
        return ids

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=False)

    def encode_prompt(self, text: str, param: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        """The token ids of a request's text (its field: `param`). A text too long to fit the context, however
        it tokenizes, is refused before it is encoded: encoding megabytes takes seconds."""
        if len(text) > self.context_length * self.longest_token:
            raise RequestError(
                f"This model's maximum context length is {self.context_length} tokens; the request's "
                f"{len(text)} characters of {param} are more tokens than that (a token is at most "
                f"{self.longest_token} characters here). Shorten the prompt.", param=param,
                code="context_length_exceeded")
        return self.encode(text, add_special_tokens)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the conversation rendered by the chat template, ending with the assistant's turn."""
        from jinja2 import TemplateError

        try:
            with self.tokenizer_lock:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as error:  # templates raise on conversations they do not accept
            raise RequestError(f"the chat template refused the messages: {error}", param="messages") from None
        # The template writes any BOS itself; the tokenizer must not add a second one.
        return self.encode_prompt(text, "messages", add_special_tokens=False)

    def check_budget(self, prompt_tokens: int, max_tokens: int | None, prompt_param: str = "prompt") -> int:
        """The max_tokens to generate (default: the rest of the context); RequestError when it cannot fit.
        `prompt_param` is the request's field of the prompt (prompt, messages), named when that is at fault."""
        if prompt_tokens == 0:
            raise RequestError("the prompt is empty", param=prompt_param)
        room = self.context_length - prompt_tokens
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            asked = "" if max_tokens is None else f" and {max_tokens} completion tokens"
            raise RequestError(
                f"This model's maximum context length is {self.context_length} tokens; the request has "
                f"{prompt_tokens} prompt tokens{asked}. Shorten the prompt or lower max_tokens.",
                param="max_tokens" if room > 0 else prompt_param, code="context_length_exceeded")
        return room if max_tokens is None else max_tokens

    # --- generation --------------------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
        from forgather.models.causal_lm import sample_next_token

        top_p = params.top_p if params.top_p < 1.0 else None
        return int(sample_next_token(logits.float(), params.temperature, None, top_p, generator)[0])

    @torch.inference_mode()
    def tokens(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        """Token ids as they are sampled: up to max_tokens, stopping after a stop token (not yielded)."""
        from .placement import input_device

        device = input_device(self.model)
        input_ids = torch.tensor([prompt_ids], device=device)
        cache, generator = None, None
        for _ in range(params.max_tokens):
            output = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache, logits = output.past_key_values, output.logits[:, -1]
            if generator is None and params.temperature > 0:
                seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
                generator = torch.Generator(device=logits.device).manual_seed(seed)
            token = self._sample(logits, params, generator)
            if token in self.stop_token_ids:
                return
            yield token
            input_ids = torch.tensor([[token]], device=device)

    def stream(
        self, prompt_ids: list[int], params: SamplingParams, cancelled: threading.Event | None = None
    ) -> Iterator[Delta]:
        """Text deltas of the completion; stop strings end it and are not part of the text. EngineStopped once
        the backend is closed (before the first token, or between two)."""
        text = self.text_stream(params)
        if self.stopping.is_set():
            raise EngineStopped(SHUTTING_DOWN)
        for token in self.tokens(prompt_ids, params):
            delta = text.push(token)
            if delta is not None:
                yield delta
                if delta.finish_reason is not None:
                    return
            if cancelled is not None and cancelled.is_set():
                return
            if self.stopping.is_set():
                raise EngineStopped(SHUTTING_DOWN)
        yield text.finish("length" if text.tokens == params.max_tokens else "stop")

    def text_stream(self, params: SamplingParams) -> TextStream:
        """A completion's incremental detokenizer with its stop strings."""
        return TextStream(self.decode, params.stop)
