"""Stage 1 of a request: reading its body; and the record it carries through the stages."""
