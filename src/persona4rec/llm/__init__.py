"""Offline persona generation over OpenAI-compatible LLM endpoints.

Stages (each a function in :mod:`.stages` and a ``persona4rec llm`` subcommand):
aspects per review -> item summaries -> personas per item -> persona selection
(LLM as judge). The client (:mod:`.client`) speaks ``/chat/completions`` over
httpx; :mod:`.jobs` makes runs resumable and cached; :mod:`.batch` sends the same calls
through the OpenAI Batch API. See docs/llm.md.
"""

from .batch import BatchClient
from .client import ChatClient, ClientConfig, FatalLLMError, LLMError, RequestRejected, RetriesExhausted
from .jobs import JobRunner, RunSummary, Task, read_jsonl
from .prompts import DEFAULT_PROMPT_VERSION, available_domains, load_prompt_set
from .schemas import SchemaError

__all__ = [
    "BatchClient", "ChatClient", "ClientConfig", "FatalLLMError", "LLMError", "RequestRejected", "RetriesExhausted",
    "JobRunner", "RunSummary", "Task", "read_jsonl",
    "DEFAULT_PROMPT_VERSION", "available_domains", "load_prompt_set", "SchemaError",
]
