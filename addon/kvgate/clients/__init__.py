"""Calls to the helper services: LMCache's controller and vLLM's /tokenize, over HTTP."""
