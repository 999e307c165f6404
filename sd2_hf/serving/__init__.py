"""vLLM serving: server lifecycle in the vLLM environment, speculative-decoding counters, client."""

from sd2_hf.serving.client import OpenAIClient, RequestFailed
from sd2_hf.serving.metrics import SpecDecodeCounters
from sd2_hf.serving.server import ServerError, VLLMServer

__all__ = ["OpenAIClient", "RequestFailed", "ServerError", "SpecDecodeCounters", "VLLMServer"]
