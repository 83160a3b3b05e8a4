"""kimi_hf."""
