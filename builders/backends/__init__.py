"""Generation backends' shared types (base.py)."""
