"""Encoder forwards shared by pretraining, fine-tuning and inference: BERT-family encoders on a packed stream."""
