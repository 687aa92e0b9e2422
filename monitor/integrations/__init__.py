"""Integrations: framework callbacks (``lightning``, ``huggingface``; each imports its
framework only when used) and wrapped or distributed models (``distributed``)."""
