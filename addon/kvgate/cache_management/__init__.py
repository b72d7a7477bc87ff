"""Stage 5, in the background: learn tokens, pin hot content, compress, free space."""
