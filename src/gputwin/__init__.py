"""gputwin: run LoRA fine-tuning arms side by side, watch them live, and get a verdict on which to keep."""

__version__ = "0.1.0"
