"""Execution backends: each turns padded batches into one logit per row."""
