"""Preference data: readers of the published formats, validation, tokenisation, collation."""
