"""Dataset records, entity tables and the generators of every dataset of the study."""
