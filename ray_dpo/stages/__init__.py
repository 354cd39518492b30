"""The Ray stages: data, weights, training, the reference pass, evaluation, storage, MLflow tracking and serving."""
