"""kvgate: a KV-cache-aware gateway for vLLM + LMCache, as a mitmproxy addon."""

__version__ = "0.1.0"
