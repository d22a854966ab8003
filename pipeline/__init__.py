"""Ray Data graph, schemas, storage and checkpointing for batch captioning."""
