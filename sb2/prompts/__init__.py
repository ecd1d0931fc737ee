"""The prompt dataset (paper 4.3, 5.1): read JourneyDB/LAION/user prompt files, normalize, filter, deduplicate,
split and shard them (:func:`sb2.prompts.build.build_prompts`), and cache their text embeddings
(:mod:`sb2.prompts.embeddings`)."""
