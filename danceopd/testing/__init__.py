"""Test fixtures the library itself never imports: tiny random models and an offline Hugging Face hub of them."""
