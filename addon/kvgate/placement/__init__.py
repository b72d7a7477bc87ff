"""Stage 3 of a request: where its prefix lives (LMCache's answer, reused; local memory)."""
