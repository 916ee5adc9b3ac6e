"""DMR: Dynamic Mixed-Precision Routing for multi-step LLM agents."""
__version__ = "0.1.0"
