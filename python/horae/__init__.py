"""horae: an LLM-serving core with the Past-Future scheduler.

The Rust core (``horae._core``) holds the KV block manager, the schedulers, the engine loop, the
model runtime and the simulator; this package is the Python front over it.
"""

from horae._core import HoraeCoreError
from horae.async_llm import AsyncLLM
from horae.beam_search import BeamSearchOutput
from horae.engine import Engine
from horae.llm import LLM
from horae.outputs import CompletionOutput, Logprob, RequestOutput
from horae.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams
from horae.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncLLM", "Engine", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput",
           "Logprob", "Tokenizer", "BeamSearchParams", "BeamSearchOutput", "HoraeCoreError", "__version__"]
