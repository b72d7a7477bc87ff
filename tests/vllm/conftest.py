"""The real-vLLM tier (marker ``vllm``): real vLLM (CPU) engines with LMCache, the real
LMCache controller, kvgate in a real mitmdump in front. Needs ``.venv-vllm``
(``scripts/vllm-cluster --install-only``, which ``scripts/test`` runs); run just this tier
with ``scripts/test -m vllm tests/vllm``."""
