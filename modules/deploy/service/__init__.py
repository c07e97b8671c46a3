"""The verification service (serve.py): a FastAPI app over one gallery and its hashing model."""
