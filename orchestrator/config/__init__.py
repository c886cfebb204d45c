"""Experiment files: the schema (`schema`), dotted paths (`paths`), loading and overrides (`loader`) and the
messages for a file that does not validate (`messages`)."""
