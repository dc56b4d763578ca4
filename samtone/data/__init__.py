"""Input pipelines: readers, tokenisation, batching into int32 arrays."""
