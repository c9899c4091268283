"""Textual widgets of the gputwin UI, one a module; formatting, prompts and feed hold their pure logic."""
