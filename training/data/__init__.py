"""Preference data: the JSONL schema, the split structure and the seeded builders."""
