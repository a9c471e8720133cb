"""Operator commands built on backup/ parts (never its orchestrator): restore, list, verify,
check."""
