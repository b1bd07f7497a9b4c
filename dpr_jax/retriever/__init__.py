"""The dense retriever: bi-encoder model, batches, loss, train step and task, corpus encoding."""
