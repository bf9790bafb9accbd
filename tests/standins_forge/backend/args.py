"""Stand-in of backend/args.py `dynamic_args` (:64-67); Forge's UI sets 'online_lora' in it (modules_forge/main_entry.py:227)."""
dynamic_args = dict(
    embedding_dir="./embeddings",
    emphasis_name="original",
)
