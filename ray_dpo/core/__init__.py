"""The torch core: the model, its kernels, log-probs, pair scoring, the loss family, DPO, decoding, the encoding,
tokenizers and the checkpoint layout. torch and einops only: no Ray, no MLflow."""
