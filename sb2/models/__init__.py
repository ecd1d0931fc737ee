"""Model loading, in one place: teacher, student, TinyVAE, CLIP and LoRA adapters, from a Hub id or a local folder."""
