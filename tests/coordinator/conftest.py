"""Front-end tests: helpers live in sibling modules (serving_harness, engine_double,
tokenizer_double), imported by name because pytest puts this folder on sys.path."""
