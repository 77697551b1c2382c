"""The evaluation harness, apart from the product: the real models and data of docs/evaluation.md
(`zoo`), their metrics (`metrics`) and the measurement protocols (`protocols`)."""
