"""Milestone validation on the trainer side (torch): loading, generation, scoring."""
