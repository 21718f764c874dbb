"""Training/evaluation data: COCO-format folders and the synthetic shapes generator."""
