"""The pure core: what gputwin knows, as plain functions and frozen records (no processes, GPU, Textual or torch)."""
