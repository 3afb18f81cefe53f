"""Model resolution, loading, per-family facts, and the embedded tiny model."""
from models.loading import (DEFAULT_MODEL, ModelRef, check_model, ensure_model, load_model, load_tokenizer,
                            model_fingerprint, resolve_model)

__all__ = ["DEFAULT_MODEL", "ModelRef", "check_model", "ensure_model", "load_model", "load_tokenizer", "model_fingerprint",
           "resolve_model"]
