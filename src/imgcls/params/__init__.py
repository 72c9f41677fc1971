"""The params schema, one module per params.yaml section (so a stage depends only on the sections it reads):
core (shared machinery), base, data, preprocess, train, evaluate, export, and project (the whole file)."""
