"""optirag: batch CTR scoring with a GCN retriever and a multi-head early-exit LLM on Ray."""

__version__ = "0.1.0"
