"""The extractive reader: model, data, loss, span decoding, predictor and training task."""
