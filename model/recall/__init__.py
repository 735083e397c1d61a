"""Cross-domain sequential retrieval (issue 9): HSTU backbone, TAPE, DDSR, GCA; see docs/recall.md."""
