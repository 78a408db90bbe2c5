"""Users, their histories and queries: typed records, loaders, splits and prompts."""
