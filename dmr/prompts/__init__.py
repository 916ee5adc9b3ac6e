"""Prompt protocols. The agent builds chat messages here; the backend's tokenizer templates them."""
from dmr.prompts.instruct import build_messages, format_answer, parse_action  # noqa: F401
