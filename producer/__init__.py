"""Wire types, codec and clients. Never imports torch."""
