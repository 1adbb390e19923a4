"""Model formats of other tools: CTranslate2 (serving) and, read and written, Hugging Face."""
