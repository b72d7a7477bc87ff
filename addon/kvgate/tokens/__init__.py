"""Stage 2 of a request: its token ids (cached, in-process, or from the engine)."""
