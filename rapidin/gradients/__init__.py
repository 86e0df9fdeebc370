"""Per-sample gradients: the model's gradient space (model), the training loss (loss), batched capture
(capture), optimizer-aware scales (optimizer) and the compressors (compress) with the RapidGrad sketch (rapidgrad)."""
