"""Fencer: powers hosts off through their power devices and reports only what it read back."""
