"""The demo and the paper's experiments: demo data (demo_words, demo_data) and model (demo_model), training
(train, pretrained), error-tracing data, the baselines (baselines, lissa) and the study tables (tables)."""
