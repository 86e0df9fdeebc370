"""Data: reading records (records), the prompt template and tokenized store (tokenize), query responses (generate)."""
